//! Avro values → Arrow scalars, and the schemas to read them with.
//!
//! Two ways to know a record's writer schema:
//! - inline (`FORMAT AVRO (SCHEMA '…')`): every value is a bare Avro datum;
//! - a Confluent schema registry (`FORMAT AVRO (SCHEMA REGISTRY 'http://…')`):
//!   every value is `0x00 · schema id (u32 BE) · datum`, and the schema of
//!   an id is fetched once (`GET /schemas/ids/{id}`) and cached.
//!
//! Columns are matched to record fields by name; unions are unwrapped;
//! records, arrays and maps become JSON text (for `json` and `text`
//! columns).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use apache_avro::types::Value;
use apache_avro::Schema;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::ScalarValue;
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// The schemas a source's records are written with.
#[derive(Debug)]
pub struct Schemas {
    inline: Option<Schema>,
    registry: Option<String>,
    by_id: Mutex<HashMap<u32, Schema>>,
}

impl Schemas {
    /// From an inline schema or a registry URL (one of them).
    pub fn new(inline: Option<&str>, registry: Option<&str>) -> Result<Schemas> {
        let inline = match inline {
            Some(s) => Some(
                Schema::parse_str(s)
                    .map_err(|e| Error::Plan(format!("invalid Avro schema: {e}")))?,
            ),
            None => None,
        };
        let registry = registry.map(|r| r.trim_end_matches('/').to_string());
        if inline.is_none() == registry.is_none() {
            return Err(Error::Syntax(
                "FORMAT AVRO needs exactly one of SCHEMA '…' or SCHEMA REGISTRY 'http://…'".into(),
            ));
        }
        if let Some(r) = &registry {
            if !r.starts_with("http://") {
                return Err(Error::unsupported(format!(
                    "schema registry URL '{r}': only http:// is supported"
                )));
            }
        }
        Ok(Schemas {
            inline,
            registry,
            by_id: Mutex::new(HashMap::new()),
        })
    }

    /// The fields of one record.
    pub fn decode(&self, payload: &[u8]) -> Result<Vec<(String, Value)>> {
        let mut fetched = None;
        let value = match &self.inline {
            Some(schema) => read(schema, payload)?,
            None => {
                let [0, a, b, c, d, datum @ ..] = payload else {
                    return Err(Error::Decode(
                        "not in the schema-registry wire format (magic byte 0, schema id)".into(),
                    ));
                };
                let id = u32::from_be_bytes([*a, *b, *c, *d]);
                let schema = self.schema(id)?;
                let v = read(&schema, datum)?;
                fetched = Some(schema);
                v
            }
        };
        match value {
            Value::Record(mut fields) => {
                if let Some(schema) = fetched.as_ref().or(self.inline.as_ref()) {
                    decimals_as_text(schema, &mut fields)?;
                }
                Ok(fields)
            }
            other => Err(Error::Decode(format!(
                "an Avro record was expected, not {other:?}"
            ))),
        }
    }

    fn schema(&self, id: u32) -> Result<Schema> {
        if let Some(s) = self.by_id.lock().get(&id) {
            return Ok(s.clone());
        }
        let url = self
            .registry
            .as_deref()
            .ok_or_else(|| Error::Internal("no schema registry".into()))?;
        let body = http_get(url, &format!("/schemas/ids/{id}"))?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| Error::Connector(format!("schema registry answered {body:?}: {e}")))?;
        let text = v
            .get("schema")
            .and_then(|s| s.as_str())
            .ok_or_else(|| Error::Decode(format!("schema registry has no schema {id}: {body}")))?;
        let schema = Schema::parse_str(text)
            .map_err(|e| Error::Decode(format!("schema {id} from the registry: {e}")))?;
        self.by_id.lock().insert(id, schema.clone());
        Ok(schema)
    }
}

/// Replaces the record's top-level decimal values by their text: a
/// decoded `Decimal` is only the unscaled integer, its scale is in the
/// schema, and a column (numeric, or text) takes the text exactly.
fn decimals_as_text(schema: &Schema, fields: &mut [(String, Value)]) -> Result<()> {
    let Schema::Record(r) = schema else {
        return Ok(());
    };
    for (f, (_, v)) in r.fields.iter().zip(fields.iter_mut()) {
        let (s, v) = match (&f.schema, v) {
            (Schema::Union(u), Value::Union(i, inner)) => match u.variants().get(*i as usize) {
                Some(s) => (s, inner.as_mut()),
                None => continue,
            },
            (s, v) => (s, v),
        };
        if let (Schema::Decimal(d), Value::Decimal(x)) = (s, &*v) {
            let bytes = <Vec<u8>>::try_from(x)
                .map_err(|e| Error::Decode(format!("invalid Avro decimal: {e}")))?;
            *v = Value::String(decimal_text(&bytes, d.scale)?);
        }
    }
    Ok(())
}

/// The text of a decimal: big-endian two's complement unscaled bytes and
/// a scale.
fn decimal_text(bytes: &[u8], scale: usize) -> Result<String> {
    if bytes.len() > 16 {
        return Err(Error::Decode(format!(
            "Avro decimal of {} bytes is too large",
            bytes.len()
        )));
    }
    let fill = if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        0xFF
    } else {
        0
    };
    let mut b = [fill; 16];
    b[16 - bytes.len()..].copy_from_slice(bytes);
    let v = i128::from_be_bytes(b);
    let digits = v.unsigned_abs().to_string();
    let digits = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = digits.split_at(digits.len() - scale);
    let sign = if v < 0 { "-" } else { "" };
    Ok(if scale == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    })
}

#[allow(deprecated)]
fn read(schema: &Schema, mut datum: &[u8]) -> Result<Value> {
    let v = apache_avro::from_avro_datum(schema, &mut datum, None)
        .map_err(|e| Error::Decode(format!("invalid Avro: {e}")))?;
    if !datum.is_empty() {
        return Err(Error::Decode(format!(
            "{} bytes after the Avro datum",
            datum.len()
        )));
    }
    // apache-avro reads a string cut short by the end of the datum as a
    // null: a truncated record must be an error, so check the value
    // against its schema.
    if !v.validate(schema) {
        return Err(Error::Decode(
            "invalid Avro: the datum is truncated or does not match its schema".into(),
        ));
    }
    Ok(v)
}

/// A blocking HTTP/1.1 GET (the registry is plain HTTP; a failure is an
/// error the caller records, not a stall: 10 s timeouts).
fn http_get(base: &str, path: &str) -> Result<String> {
    http(base, "GET", path, None)
}

/// Registers `schema` under `subject` (`POST /subjects/{subject}/versions`)
/// and returns its id. Registering a schema the subject already has
/// answers that schema's id, so this is idempotent.
pub fn register(base: &str, subject: &str, schema: &str) -> Result<u32> {
    let body = serde_json::json!({ "schema": schema }).to_string();
    let reply = http(
        base,
        "POST",
        &format!("/subjects/{subject}/versions"),
        Some(&body),
    )?;
    let v: serde_json::Value = serde_json::from_str(&reply)
        .map_err(|e| Error::Connector(format!("schema registry answered {reply:?}: {e}")))?;
    v.get("id")
        .and_then(|id| id.as_u64())
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| {
            Error::Connector(format!(
                "schema registry {base}: registering subject {subject} answered {reply}"
            ))
        })
}

/// A blocking HTTP/1.1 request, `body` as JSON.
fn http(base: &str, method: &str, path: &str, body: Option<&str>) -> Result<String> {
    let hostport = base.trim_start_matches("http://");
    let hostport = hostport.split('/').next().unwrap_or(hostport);
    let err = |e: std::io::Error| Error::Connector(format!("schema registry {base}: {e}"));
    let addr = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let sock = addr
        .to_socket_addrs()
        .map_err(err)?
        .next()
        .ok_or_else(|| Error::Connector(format!("schema registry {base}: no address")))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(10)).map_err(err)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    let request = match body {
        None => format!(
            "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
        ),
        Some(b) => format!(
            "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nAccept: application/json\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
            b.len()
        ),
    };
    stream.write_all(request.as_bytes()).map_err(err)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(err)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::Connector(format!("schema registry {base}: bad HTTP response")))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        let status = head.lines().next().unwrap_or_default();
        // A GET fails on a record (decoding); a POST fails the statement.
        let msg = format!("schema registry {base}{path}: {status} {}", body.trim());
        return Err(if method == "GET" {
            Error::Decode(msg)
        } else {
            Error::Connector(msg)
        });
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_string())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A record field as a scalar of the column's type (`None`: the field is
/// missing → NULL).
pub fn to_scalar(v: Option<&Value>, dt: &DataType, json: bool) -> Result<ScalarValue> {
    let null = || ScalarValue::try_from(dt).map_err(Error::from);
    let Some(v) = v else {
        return null();
    };
    let v = match v {
        Value::Union(_, inner) => inner.as_ref(),
        v => v,
    };
    if json || matches!(v, Value::Record(_) | Value::Array(_) | Value::Map(_)) {
        if matches!(v, Value::Null) {
            return null();
        }
        let j: serde_json::Value = v
            .clone()
            .try_into()
            .map_err(|e| Error::Decode(format!("Avro value as JSON: {e}")))?;
        return cast(ScalarValue::Utf8(Some(j.to_string())), dt);
    }
    let s = match v {
        Value::Null => return null(),
        Value::Boolean(b) => ScalarValue::Boolean(Some(*b)),
        Value::Int(i) => ScalarValue::Int64(Some(*i as i64)),
        Value::Long(l) => ScalarValue::Int64(Some(*l)),
        Value::Float(f) => ScalarValue::Float64(Some(*f as f64)),
        Value::Double(d) => ScalarValue::Float64(Some(*d)),
        Value::String(s) | Value::Enum(_, s) => ScalarValue::Utf8(Some(s.clone())),
        Value::Bytes(b) | Value::Fixed(_, b) => ScalarValue::Binary(Some(b.clone())),
        Value::Date(d) => ScalarValue::Date32(Some(*d)),
        Value::TimestampMillis(ms) | Value::LocalTimestampMillis(ms) => {
            ScalarValue::TimestampMicrosecond(Some(ms.saturating_mul(1000)), None)
        }
        Value::TimestampMicros(us) | Value::LocalTimestampMicros(us) => {
            ScalarValue::TimestampMicrosecond(Some(*us), None)
        }
        Value::TimestampNanos(ns) | Value::LocalTimestampNanos(ns) => {
            ScalarValue::TimestampMicrosecond(Some(ns / 1000), None)
        }
        Value::TimeMillis(ms) => ScalarValue::Time64Microsecond(Some(*ms as i64 * 1000)),
        Value::TimeMicros(us) => ScalarValue::Time64Microsecond(Some(*us)),
        Value::Uuid(u) => ScalarValue::Utf8(Some(u.to_string())),
        other => {
            return Err(Error::Decode(format!(
                "Avro value {other:?} is not supported"
            )))
        }
    };
    cast(s, dt)
}

fn cast(s: ScalarValue, dt: &DataType) -> Result<ScalarValue> {
    if &s.data_type() == dt {
        return Ok(s);
    }
    // Timestamps: keep the unit, adopt the column's time zone.
    if let (
        ScalarValue::TimestampMicrosecond(v, _),
        DataType::Timestamp(TimeUnit::Microsecond, tz),
    ) = (&s, dt)
    {
        return Ok(ScalarValue::TimestampMicrosecond(*v, tz.clone()));
    }
    s.cast_to(dt)
        .map_err(|e| Error::Decode(format!("Avro value does not fit the column: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_schemas_and_reads_decimals_as_text() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for stream in listener.incoming().take(2) {
                let mut stream = stream.unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // Headers, then the Content-Length body.
                loop {
                    let n = stream.read(&mut buf).unwrap();
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .map(|v| v.trim().parse().unwrap())
                            .unwrap_or(0);
                        if body.len() >= len {
                            break;
                        }
                    }
                }
                let req = String::from_utf8_lossy(&req).to_string();
                let reply = if req.starts_with("POST /subjects/t-value/versions ") {
                    "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"id\":42}"
                } else {
                    "HTTP/1.1 422 Unprocessable\r\nContent-Length: 14\r\n\r\n{\"error\":\"no\"}"
                };
                stream.write_all(reply.as_bytes()).unwrap();
                seen.push(req);
            }
            seen
        });
        let base = format!("http://127.0.0.1:{port}");
        assert_eq!(register(&base, "t-value", r#""long""#).unwrap(), 42);
        let e = register(&base, "t-key", r#""long""#).unwrap_err();
        assert!(matches!(e, Error::Connector(_)), "{e:?}");
        assert!(e.to_string().contains("422"), "{e}");
        let seen = server.join().unwrap();
        assert!(seen[0].ends_with(r#"{"schema":"\"long\""}"#), "{}", seen[0]);

        assert_eq!(decimal_text(&[0x30, 0x39], 2).unwrap(), "123.45");
        assert_eq!(decimal_text(&[0xff, 0x85], 3).unwrap(), "-0.123");
        assert_eq!(decimal_text(&[0x07], 0).unwrap(), "7");
        assert!(decimal_text(&[1; 17], 0).is_err());
    }

    #[test]
    fn decodes_inline_and_registry_records() {
        let text = r#"{"type": "record", "name": "bid", "fields": [
            {"name": "auction", "type": "long"},
            {"name": "note", "type": ["null", "string"]},
            {"name": "tags", "type": {"type": "array", "items": "string"}}]}"#;
        let schema = Schema::parse_str(text).unwrap();
        let value = Value::Record(vec![
            ("auction".into(), Value::Long(7)),
            (
                "note".into(),
                Value::Union(1, Box::new(Value::String("hi".into()))),
            ),
            ("tags".into(), Value::Array(vec![Value::String("a".into())])),
        ]);
        #[allow(deprecated)]
        let datum = apache_avro::to_avro_datum(&schema, value).unwrap();
        let inline = Schemas::new(Some(text), None).unwrap();
        let fields = inline.decode(&datum).unwrap();
        assert_eq!(
            to_scalar(Some(&fields[0].1), &DataType::Int32, false).unwrap(),
            ScalarValue::Int32(Some(7))
        );
        assert_eq!(
            to_scalar(Some(&fields[1].1), &DataType::Utf8, false).unwrap(),
            ScalarValue::Utf8(Some("hi".into()))
        );
        assert_eq!(
            to_scalar(Some(&fields[2].1), &DataType::Utf8, true).unwrap(),
            ScalarValue::Utf8(Some(r#"["a"]"#.into()))
        );
        assert!(inline.decode(&datum[..datum.len() - 1]).is_err());

        // A registry answering one schema.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = serde_json::json!({ "schema": text }).to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(2) {
                let mut stream = stream.unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.ends_with(b"\r\n\r\n") {
                    let n = stream.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                let req = String::from_utf8_lossy(&req).to_string();
                let reply = if req.starts_with("GET /schemas/ids/5 ") {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
                };
                stream.write_all(reply.as_bytes()).unwrap();
            }
        });
        let reg = Schemas::new(None, Some(&format!("http://127.0.0.1:{port}"))).unwrap();
        let mut framed = vec![0, 0, 0, 0, 5];
        framed.extend_from_slice(&datum);
        assert_eq!(reg.decode(&framed).unwrap(), fields);
        // Cached: the second decode does not ask again; an unknown id does.
        assert_eq!(reg.decode(&framed).unwrap(), fields);
        let mut unknown = vec![0, 0, 0, 0, 6];
        unknown.extend_from_slice(&datum);
        assert!(reg
            .decode(&unknown)
            .unwrap_err()
            .to_string()
            .contains("404"));
        assert!(reg.decode(&datum).is_err());
    }
}
