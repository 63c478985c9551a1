//! The Postgres-wire server: accept loop, connection cap, graceful shutdown.
//!
//! Modelled on mini-redis: one task per connection, a semaphore for the
//! connection cap (clients beyond it get `FATAL 53300 sorry, too many clients
//! already`, as from PostgreSQL), and a shutdown future that stops accepting,
//! gives open connections a grace period and then closes them. Only this
//! module knows the wire protocol; see [`handler`] for the query protocols
//! and [`errors`] for SQLSTATE mapping.

pub mod errors;
pub mod handler;
pub mod stream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::engine::Engine;
use crate::error::Result;
use handler::Handlers;

/// How long open connections may finish after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves connections on `listener` until `shutdown` completes.
pub async fn serve(
    engine: Arc<Engine>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let handlers = Arc::new(Handlers::new(engine.clone()));
    let cap = Arc::new(Semaphore::new(engine.config.max_connections));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (socket, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // E.g. EMFILE: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = socket.set_nodelay(true);
                match cap.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let handlers = handlers.clone();
                        connections.spawn(async move {
                            if let Err(e) = pgwire::tokio::process_socket(socket, None, handlers).await {
                                tracing::debug!(%addr, "connection ended: {e}");
                            }
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::warn!(%addr, "refusing connection: {} connections open", engine.config.max_connections);
                        connections.spawn(refuse(socket));
                    }
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    tracing::info!(
        "shutting down: waiting up to {SHUTDOWN_GRACE:?} for {} connections",
        connections.len()
    );
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        connections.shutdown().await;
    }
    Ok(())
}

const SSL_REQUEST: u32 = 80877103;
const GSS_REQUEST: u32 = 80877104;

/// Answers a connection over the cap the way PostgreSQL does: decline
/// SSL/GSS, read the startup packet, send `FATAL 53300`, close.
async fn refuse(mut socket: TcpStream) {
    let talk = async {
        loop {
            let len = socket.read_u32().await? as usize;
            if !(8..=10_000).contains(&len) {
                break;
            }
            let mut body = vec![0u8; len - 4];
            socket.read_exact(&mut body).await?;
            let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            if len == 8 && (code == SSL_REQUEST || code == GSS_REQUEST) {
                socket.write_all(b"N").await?;
                continue;
            }
            break;
        }
        let mut fields = Vec::new();
        for (tag, value) in [
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', "53300"),
            (b'M', "sorry, too many clients already"),
        ] {
            fields.push(tag);
            fields.extend_from_slice(value.as_bytes());
            fields.push(0);
        }
        fields.push(0);
        let mut msg = vec![b'E'];
        msg.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
        msg.extend_from_slice(&fields);
        socket.write_all(&msg).await?;
        socket.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), talk).await;
}
