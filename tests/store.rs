//! The store contract (`common/store_contract.rs`) against the embedded SQLite store.

mod common;

use common::store_contract;
use talos_kms_server::store::{NodeLimits, SqliteStore, Store};

fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("kms.db")).unwrap();
    (dir, store)
}

#[tokio::test]
async fn lookups_at_once_each_find_their_own() {
    let (_dir, store) = store();
    store_contract::lookups_at_once_each_find_their_own(&store).await;
}

#[tokio::test]
async fn node_limits_and_hourly_counts() {
    let (_dir, store) = store();
    store_contract::node_limits_and_hourly_counts(&store).await;
}

#[tokio::test]
async fn seals_at_once_stay_within_the_quota() {
    let (_dir, store) = store();
    store_contract::seals_at_once_stay_within_the_quota(&store).await;
}

#[tokio::test]
async fn windows_open_move_and_close() {
    let (_dir, store) = store();
    store_contract::windows_open_move_and_close(&store).await;
}

#[tokio::test]
async fn approvals_wait_pass_expire_and_deny() {
    let (_dir, store) = store();
    store_contract::approvals_wait_pass_expire_and_deny(&store).await;
}

#[tokio::test]
async fn record_ids_are_never_reused() {
    let (_dir, store) = store();
    store_contract::record_ids_are_never_reused(&store).await;
}

#[tokio::test]
async fn an_unreadable_approval_is_an_error() {
    let (dir, store) = store();
    let path = dir.path().join("kms.db");
    store_contract::an_unreadable_approval_is_an_error(&store, |id| async move {
        // The schema's CHECK would refuse the state; a hand edit can switch it off.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "ignore_check_constraints", true)
            .unwrap();
        conn.execute("UPDATE approvals SET state = 'expired' WHERE id = ?1", [id])
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn foreign_blobs_are_bound_once() {
    let (_dir, store) = store();
    store_contract::foreign_blobs_are_bound_once(&store).await;
}

/// The counter lives in the file: a restart does not hand out a purged id again either.
#[tokio::test]
async fn a_purged_id_stays_used_across_a_reopen() {
    let (dir, store) = store();
    store_contract::record_ids_are_never_reused(&store).await;
    drop(store);
    let store = SqliteStore::open(&dir.path().join("kms.db")).unwrap();
    let everything = talos_kms_server::store::RecordFilter::default();
    let newest = store.list(&everything, 0, 10).await.unwrap();
    let highest = newest.iter().map(|r| r.id).max().unwrap();
    store.delete(&[highest], &everything).await.unwrap();
    drop(store);
    let store = SqliteStore::open(&dir.path().join("kms.db")).unwrap();
    let record = talos_kms_server::store::NewRecord {
        nonce: [42; 12],
        node_uuid: "node-k".into(),
        ip: "10.0.2.4".into(),
        ciphertext: vec![0; 48],
        created_at: 1_000,
        last_access: None,
        custody: Default::default(),
    };
    let id = match store.insert(record, NodeLimits::NONE).await.unwrap() {
        talos_kms_server::store::Inserted::Stored(id, _) => id,
        other => panic!("{other:?}"),
    };
    assert!(id > highest, "id {id} after purging {highest}");
}
