//! The store contract (`common/store_contract.rs`) against the embedded SQLite store.

mod common;

use common::store_contract;
use talos_kms_server::store::SqliteStore;

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
async fn node_summaries_and_hourly_counts() {
    let (_dir, store) = store();
    store_contract::node_summaries_and_hourly_counts(&store).await;
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
