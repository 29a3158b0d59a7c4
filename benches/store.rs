//! The embedded store: durable inserts (alone and group-committed) and lookups at 1k and
//! 1M records. `cargo bench` builds the 1M database once (about a minute); under
//! `cargo test` the large case uses 10k records so the suite stays fast.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use std::sync::Arc;
use talos_kms_server::bench::fill;
use talos_kms_server::sealing;
use talos_kms_server::store::{NewRecord, NodeLimits, SqliteStore, Store, now};
use tokio::runtime::Runtime;

fn new_record(index: usize) -> NewRecord {
    let sealed = sealing::seal("bench-node", "10.0.0.1", &[index as u8; 32]).unwrap();
    NewRecord {
        nonce: sealed.nonce,
        node_uuid: format!("bench-{index}"),
        ip: "10.0.0.1".into(),
        ciphertext: sealed.ciphertext,
        created_at: now(),
        last_access: None,
        custody: Default::default(),
    }
}

fn inserts(c: &mut Criterion) {
    let runtime = Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("insert.db")).unwrap());
    let mut group = c.benchmark_group("insert (durable)");
    group.sample_size(10);
    group.bench_function("one at a time", |b| {
        b.to_async(&runtime).iter_batched(
            || new_record(0),
            |record| {
                let store = Arc::clone(&store);
                async move { store.insert(record, NodeLimits::NONE).await.unwrap() }
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("32 concurrent (group commit), per batch of 32", |b| {
        b.to_async(&runtime).iter_batched(
            || (0..32).map(new_record).collect::<Vec<_>>(),
            |records| {
                let store = Arc::clone(&store);
                async move {
                    let inserts = records.into_iter().map(|record| {
                        let store = Arc::clone(&store);
                        tokio::spawn(async move {
                            store.insert(record, NodeLimits::NONE).await.unwrap()
                        })
                    });
                    for insert in inserts.collect::<Vec<_>>() {
                        insert.await.unwrap();
                    }
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn lookups(c: &mut Criterion) {
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let large = if benchmarking { 1_000_000 } else { 10_000 };
    let runtime = Runtime::new().unwrap();
    let mut group = c.benchmark_group("lookup by nonce");
    for filler in [1_000u64, large] {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("lookup.db")).unwrap();
        let known: Vec<_> = (0..1_000).map(new_record).collect();
        runtime.block_on(async {
            for record in &known {
                store
                    .insert(record.clone(), NodeLimits::NONE)
                    .await
                    .unwrap();
            }
            fill::fill_store(&store, filler).await.unwrap();
        });
        let mut next = 0;
        group.bench_function(format!("{} records", filler + 1_000), |b| {
            b.to_async(&runtime).iter(|| {
                next = (next + 1) % known.len();
                let nonce = known[next].nonce;
                let store = &store;
                async move { store.find_by_nonce(&nonce).await.unwrap().unwrap().id }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, inserts, lookups);
criterion_main!(benches);
