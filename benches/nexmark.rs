//! Nexmark over the in-process generator: events per second per query.
//!
//! ```sh
//! cargo bench --bench nexmark                 # BENCH_EVENTS=1000000, all queries
//! BENCH_QUERIES=q0,q4 cargo bench --bench nexmark
//! ```
//!
//! For each query: a fresh engine on a fresh data directory (fsync on, the
//! default), the Nexmark sources the query reads (`RATE 0`, i.e. as fast as
//! the views take them, `EVENTS` = BENCH_EVENTS of the whole sequence), the
//! query as a materialized view, then the wall time until every source has
//! committed its last row. The epoch driver runs the whole dataflow on one
//! thread, so events/s is also events/s per core (RocksDB's flushes and
//! compactions run on background threads).
//!
//! The baseline in the same run is the generator alone: producing the same
//! bid rows as Arrow batches without any view.

use std::time::{Duration, Instant};

use sluice::config::Config;
use sluice::connector::{GeneratorSpec, NexmarkTable};
use sluice::engine::Engine;
use sluice::session::Session;

const QUERIES: &[(&str, &str)] = &[
    ("q0", "SELECT auction, bidder, price, date_time FROM bid"),
    (
        "q1",
        "SELECT auction, bidder, 0.908 * price AS price, date_time FROM bid",
    ),
    ("q2", "SELECT auction, price FROM bid WHERE auction % 123 = 0"),
    (
        "q3",
        "SELECT p.name, p.city, p.state, a.id FROM auction a JOIN person p ON a.seller = p.id \
         WHERE a.category = 10 AND (p.state = 'or' OR p.state = 'id' OR p.state = 'ca')",
    ),
    (
        "q4",
        "SELECT q.category, avg(q.final) AS avg FROM (SELECT max(b.price) AS final, a.category \
         FROM auction a JOIN bid b ON a.id = b.auction \
         WHERE b.date_time BETWEEN a.date_time AND a.expires GROUP BY a.id, a.category) q \
         GROUP BY q.category",
    ),
    (
        "q9",
        "SELECT id, item_name, seller, category, auction, bidder, price, bid_date_time FROM ( \
         SELECT a.id, a.item_name, a.seller, a.category, b.auction, b.bidder, b.price, \
         b.date_time AS bid_date_time, ROW_NUMBER() OVER (PARTITION BY a.id ORDER BY b.price DESC, b.date_time) AS rn \
         FROM auction a JOIN bid b ON a.id = b.auction \
         WHERE b.date_time BETWEEN a.date_time AND a.expires) t WHERE rn <= 1",
    ),
    (
        "q14",
        "SELECT auction, bidder, 0.908 * price AS price, \
         CASE WHEN extract(hour FROM date_time) >= 8 AND extract(hour FROM date_time) <= 18 THEN 'dayTime' \
         WHEN extract(hour FROM date_time) <= 6 OR extract(hour FROM date_time) >= 20 THEN 'nightTime' \
         ELSE 'otherTime' END AS bidtimetype, date_time, \
         length(extra) - length(replace(extra, 'c', '')) AS c_counts \
         FROM bid WHERE 0.908 * price > 1000000 AND 0.908 * price < 50000000",
    ),
    (
        "q15",
        "SELECT CAST(date_time AS DATE) AS day, count(*) AS total_bids, \
         sum(CASE WHEN price < 10000 THEN 1 ELSE 0 END) AS rank1_bids, \
         sum(CASE WHEN price >= 10000 AND price < 1000000 THEN 1 ELSE 0 END) AS rank2_bids, \
         sum(CASE WHEN price >= 1000000 THEN 1 ELSE 0 END) AS rank3_bids, \
         count(DISTINCT bidder) AS total_bidders, \
         count(DISTINCT CASE WHEN price < 10000 THEN bidder END) AS rank1_bidders, \
         count(DISTINCT CASE WHEN price >= 10000 AND price < 1000000 THEN bidder END) AS rank2_bidders, \
         count(DISTINCT CASE WHEN price >= 1000000 THEN bidder END) AS rank3_bidders, \
         count(DISTINCT auction) AS total_auctions, \
         count(DISTINCT CASE WHEN price < 10000 THEN auction END) AS rank1_auctions, \
         count(DISTINCT CASE WHEN price >= 10000 AND price < 1000000 THEN auction END) AS rank2_auctions, \
         count(DISTINCT CASE WHEN price >= 1000000 THEN auction END) AS rank3_auctions \
         FROM bid GROUP BY CAST(date_time AS DATE)",
    ),
    (
        "q16",
        "SELECT channel, CAST(date_time AS DATE) AS day, max(extract(hour FROM date_time)) AS max_hour, \
         count(*) AS total_bids, \
         sum(CASE WHEN price < 10000 THEN 1 ELSE 0 END) AS rank1_bids, \
         sum(CASE WHEN price >= 10000 AND price < 1000000 THEN 1 ELSE 0 END) AS rank2_bids, \
         sum(CASE WHEN price >= 1000000 THEN 1 ELSE 0 END) AS rank3_bids, \
         count(DISTINCT bidder) AS total_bidders, \
         count(DISTINCT CASE WHEN price < 10000 THEN bidder END) AS rank1_bidders, \
         count(DISTINCT auction) AS total_auctions, \
         count(DISTINCT CASE WHEN price < 10000 THEN auction END) AS rank1_auctions \
         FROM bid GROUP BY channel, CAST(date_time AS DATE)",
    ),
    (
        "q17",
        "SELECT auction, CAST(date_time AS DATE) AS day, count(*) AS total_bids, \
         sum(CASE WHEN price < 10000 THEN 1 ELSE 0 END) AS rank1_bids, \
         sum(CASE WHEN price >= 10000 AND price < 1000000 THEN 1 ELSE 0 END) AS rank2_bids, \
         sum(CASE WHEN price >= 1000000 THEN 1 ELSE 0 END) AS rank3_bids, \
         min(price) AS min_price, max(price) AS max_price, avg(price) AS avg_price, sum(price) AS sum_price \
         FROM bid GROUP BY auction, CAST(date_time AS DATE)",
    ),
    (
        "q18",
        "SELECT auction, bidder, price, channel, url, date_time FROM (SELECT *, ROW_NUMBER() OVER \
         (PARTITION BY bidder, auction ORDER BY date_time DESC) AS rank_number FROM bid) t \
         WHERE rank_number <= 1",
    ),
    (
        "q19",
        "SELECT auction, bidder, price, channel, url, date_time, rank_number FROM (SELECT *, ROW_NUMBER() OVER \
         (PARTITION BY auction ORDER BY price DESC) AS rank_number FROM bid) t WHERE rank_number <= 10",
    ),
    (
        "q20",
        "SELECT auction, bidder, price, channel, url, b.date_time AS bid_date_time, item_name, description, \
         initial_bid, reserve, a.date_time AS auction_date_time, expires, seller, category \
         FROM bid b JOIN auction a ON b.auction = a.id WHERE a.category = 10",
    ),
    (
        "q21",
        "SELECT auction, bidder, price, channel, \
         CASE WHEN lower(channel) = 'apple' THEN '0' WHEN lower(channel) = 'google' THEN '1' \
         WHEN lower(channel) = 'facebook' THEN '2' WHEN lower(channel) = 'baidu' THEN '3' \
         ELSE (regexp_match(url, '(&|^)channel_id=([^&]*)'))[2] END AS channel_id \
         FROM bid WHERE (regexp_match(url, '(&|^)channel_id=([^&]*)'))[2] IS NOT NULL \
         OR lower(channel) IN ('apple', 'google', 'facebook', 'baidu')",
    ),
    (
        "q22",
        "SELECT auction, bidder, price, channel, split_part(url, '/', 4) AS dir1, \
         split_part(url, '/', 5) AS dir2, split_part(url, '/', 6) AS dir3 FROM bid",
    ),
];

const BASE_TIME: u64 = 1_700_000_000_000;

async fn run(session: &mut Session, sql: &str) -> Result<(), String> {
    let engine = session.engine().clone();
    let prepared = Session::prepare(&engine, sql)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("empty statement")?;
    session
        .execute(&prepared, None, false, false)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Runs one query; returns (source rows, seconds) or why it could not run.
async fn bench_query(query: &str, events: u64) -> Result<(u64, f64), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let engine = Engine::open(Config::for_data_dir(dir.path())).map_err(|e| e.to_string())?;
    let mut session = Session::new(engine.clone());
    let lower = query.to_lowercase();
    let tables: Vec<&str> = ["person", "auction", "bid"]
        .into_iter()
        .filter(|t| lower.contains(&format!("from {t}")) || lower.contains(&format!("join {t}")))
        .collect();
    let start = Instant::now();
    for t in &tables {
        run(
            &mut session,
            &format!(
                "CREATE SOURCE {t} FROM GENERATOR NEXMARK (TABLE '{t}', RATE 0, EVENTS {events}, BASE TIME {BASE_TIME})"
            ),
        )
        .await?;
    }
    run(
        &mut session,
        &format!("CREATE MATERIALIZED VIEW v AS {query}"),
    )
    .await?;
    loop {
        let status = engine.driver.status();
        if let Some(s) = status.iter().find(|s| s.state.starts_with("failed")) {
            return Err(format!("source {}: {}", s.name, s.state));
        }
        if status.iter().all(|s| s.state == "finished") {
            let rows = status.iter().map(|s| s.offset).sum();
            return Ok((rows, start.elapsed().as_secs_f64()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn baseline(events: u64) -> (u64, f64) {
    let spec = GeneratorSpec::Nexmark {
        table: NexmarkTable::Bid,
        rate: 0,
        events: Some(events),
        base_time_ms: BASE_TIME,
    };
    let limit = spec.limit().unwrap_or(0);
    let start = Instant::now();
    let mut from = 0;
    let mut rows = 0;
    while from < limit {
        let to = limit.min(from + sluice::epoch::MAX_EPOCH_ROWS);
        rows += spec.generate(from, to).map(|b| b.num_rows()).unwrap_or(0) as u64;
        from = to;
    }
    (rows, start.elapsed().as_secs_f64())
}

fn main() {
    let events: u64 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let only: Option<Vec<String>> = std::env::var("BENCH_QUERIES")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    println!(
        "nexmark: {events} events per query, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let (rows, secs) = baseline(events);
    println!(
        "| generator only (bid rows as Arrow, no view) | {rows} | {secs:.2} | {:.0} |",
        rows as f64 / secs
    );
    for (name, query) in QUERIES {
        if only.as_ref().is_some_and(|o| !o.iter().any(|q| q == name)) {
            continue;
        }
        match runtime.block_on(bench_query(query, events)) {
            Ok((rows, secs)) => println!(
                "| {name} | {rows} | {secs:.2} | {:.0} |",
                rows as f64 / secs
            ),
            Err(e) => println!("| {name} | not maintainable: {e} | | |"),
        }
    }
}
