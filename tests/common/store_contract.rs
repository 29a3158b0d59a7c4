//! What every `Store` backend must do with the policy's state, written once and run against
//! each backend (SQLite here; PostgreSQL where it is available).

use talos_kms_server::store::{
    Approval, ApprovalState, Binding, Decision, Inserted, NewBinding, NewRecord, NodeLimits,
    NodeSummary, Operation, RecordFilter, RecordInfo, RecordState, Store, Window,
};

fn record(nonce: u8, node: &str, ip: &str, created_at: i64) -> NewRecord {
    NewRecord {
        nonce: [nonce; 12],
        node_uuid: node.into(),
        ip: ip.into(),
        ciphertext: vec![0; 48],
        created_at,
        last_access: None,
        custody: Default::default(),
    }
}

/// Runs the calls polled together, so that they are in flight at once; their answers in order.
async fn all_at_once<T>(calls: impl Iterator<Item = impl Future<Output = T>>) -> Vec<T> {
    let mut calls: Vec<_> = calls.map(Box::pin).collect();
    let mut answers: Vec<Option<T>> = calls.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (call, slot) in calls.iter_mut().zip(answers.iter_mut()) {
            if slot.is_none()
                && let std::task::Poll::Ready(answer) = call.as_mut().poll(cx)
            {
                *slot = Some(answer);
            }
        }
        if answers.iter().all(Option::is_some) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    answers.into_iter().flatten().collect()
}

/// Unseals arrive together (a cluster booting): each lookup gets its own record, the same
/// blob looked up twice at once is found twice, and an unknown nonce is found nowhere.
pub async fn lookups_at_once_each_find_their_own(store: &dyn Store) {
    for nonce in 1..=20u8 {
        let ip = format!("10.0.1.{nonce}");
        store
            .insert(record(nonce, "node-l", &ip, 1_000), NodeLimits::NONE)
            .await
            .unwrap();
    }
    let wanted: Vec<u8> = (1..=20).chain([7, 7, 99]).collect();
    let lookups = wanted
        .iter()
        .map(|&nonce| async move { store.find_by_nonce(&[nonce; 12]).await.unwrap() });
    let found = all_at_once(lookups).await;
    for (nonce, record) in wanted.iter().zip(found) {
        match record {
            Some(record) => assert_eq!(record.ip, format!("10.0.1.{nonce}")),
            None => assert_eq!(*nonce, 99, "record {nonce} not found"),
        }
    }
}

/// A seal is stored only while its node is within the limits it was sealed under, checked
/// where it is stored: the answer says what the node had before.
pub async fn node_limits_and_hourly_counts(store: &dyn Store) {
    let now = 1_000_000;
    for (nonce, node, ip, at) in [
        (1, "node-a", "10.0.0.1", now - 7200),
        (2, "node-a", "10.0.0.1", now - 10),
        (3, "node-a", "10.0.0.2", now),
        (4, "node-b", "10.0.0.3", now),
    ] {
        store
            .insert(record(nonce, node, ip, at), NodeLimits::NONE)
            .await
            .unwrap();
    }
    let quota = |max_records| NodeLimits {
        max_records,
        one_address: false,
    };
    let pinned = NodeLimits {
        max_records: 0,
        one_address: true,
    };
    let refused = |inserted| match inserted {
        Inserted::OverLimits(summary) => summary,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let stored = |inserted| match inserted {
        Inserted::Stored(_, summary) => summary,
        other => panic!("expected a stored record, got {other:?}"),
    };
    let summary = refused(
        store
            .insert(record(5, "node-a", "10.0.0.9", now), quota(3))
            .await
            .unwrap(),
    );
    assert_eq!(summary.records, 3);
    let mut addresses = summary.other_addresses.clone();
    addresses.sort();
    assert_eq!(addresses, ["10.0.0.1", "10.0.0.2"]);
    let summary = refused(
        store
            .insert(record(5, "node-a", "10.0.0.1", now), pinned)
            .await
            .unwrap(),
    );
    assert_eq!(summary.other_addresses, ["10.0.0.2"]);
    assert_eq!(
        store.created_since(now - 3600).await.unwrap(),
        3,
        "refusals add nothing"
    );

    // A revoked record still takes room, but binds no address.
    let listed = store.list(&Default::default(), 0, 10).await.unwrap();
    let id = listed.iter().find(|r| r.ip == "10.0.0.2").unwrap().id;
    store.set_revoked(&[(id, None)], Some(now)).await.unwrap();
    let summary = stored(
        store
            .insert(record(5, "node-a", "10.0.0.1", now), pinned)
            .await
            .unwrap(),
    );
    assert_eq!((summary.records, summary.other_addresses.len()), (3, 0));
    let summary = refused(
        store
            .insert(record(6, "node-a", "10.0.0.9", now), quota(4))
            .await
            .unwrap(),
    );
    assert_eq!(summary.records, 4);
    assert_eq!(summary.other_addresses, ["10.0.0.1"]);
    let summary = stored(
        store
            .insert(record(6, "node-x", "10.0.0.1", now), quota(1))
            .await
            .unwrap(),
    );
    assert_eq!(summary, NodeSummary::default());
    assert_eq!(store.created_since(now - 3600).await.unwrap(), 5);
}

/// Seals of one node arriving together (one group commit, one batch) are each counted
/// against its quota: exactly as many are stored as it allows.
pub async fn seals_at_once_stay_within_the_quota(store: &dyn Store) {
    let limits = NodeLimits {
        max_records: 3,
        one_address: false,
    };
    let seals =
        (1..=8u8).map(|nonce| store.insert(record(nonce, "node-q", "10.0.3.1", 1_000), limits));
    let answers = all_at_once(seals).await;
    let stored = answers
        .iter()
        .filter(|answer| matches!(answer, Ok(Inserted::Stored(..))))
        .count();
    let refused = answers
        .iter()
        .filter(|answer| matches!(answer, Ok(Inserted::OverLimits(_))))
        .count();
    assert_eq!((stored, refused), (3, 5), "{answers:?}");
    let filter = RecordFilter {
        node_uuid: Some("node-q".into()),
        ..Default::default()
    };
    assert_eq!(store.list(&filter, 0, 10).await.unwrap().len(), 3);
}

pub async fn windows_open_move_and_close(store: &dyn Store) {
    assert!(store.windows().await.unwrap().is_empty());
    let window = |operation, closes_at| Window {
        operation,
        opened_at: 100,
        closes_at,
        tag: None,
    };
    store
        .open_window(window(Operation::Unseal, 200))
        .await
        .unwrap();
    store
        .open_window(window(Operation::Seal, 300))
        .await
        .unwrap();
    store
        .open_window(window(Operation::Unseal, 400))
        .await
        .unwrap();
    let windows = store.windows().await.unwrap();
    assert_eq!(
        windows,
        [window(Operation::Seal, 300), window(Operation::Unseal, 400)]
    );
    assert!(store.close_window(Operation::Seal).await.unwrap());
    assert!(!store.close_window(Operation::Seal).await.unwrap());
    assert_eq!(
        store.windows().await.unwrap(),
        [window(Operation::Unseal, 400)]
    );
}

pub async fn approvals_wait_pass_expire_and_deny(store: &dyn Store) {
    let (seal, unseal) = (Operation::Seal, Operation::Unseal);
    assert_eq!(store.approval(unseal, "n", "10.0.0.1").await.unwrap(), None);
    let first = store
        .note_pending(unseal, "n", "10.0.0.1", 100, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            first.state,
            first.attempts,
            first.first_seen,
            first.last_seen
        ),
        (ApprovalState::Pending, 1, 100, 100)
    );
    let again = store
        .note_pending(unseal, "n", "10.0.0.1", 130, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (again.id, again.attempts, again.last_seen),
        (first.id, 2, 130)
    );
    // Another operation or address is another request.
    let sealing = store
        .note_pending(seal, "n", "10.0.0.1", 130, 10)
        .await
        .unwrap()
        .unwrap();
    let elsewhere = store
        .note_pending(unseal, "n", "10.0.0.2", 130, 10)
        .await
        .unwrap()
        .unwrap();
    assert!(sealing.id != first.id && elsewhere.id != first.id && sealing.id != elsewhere.id);

    let approved: Approval = store
        .decide(first.id, Decision::Approve { until: 200 }, 140, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(approved.state, ApprovalState::Approved);
    assert_eq!(
        (approved.approved_until, approved.decided_at),
        (Some(200), Some(140))
    );
    assert!(approved.allows(199) && !approved.allows(200));
    assert_eq!(
        store.approval(unseal, "n", "10.0.0.1").await.unwrap(),
        Some(approved.clone())
    );
    // Still approved while it holds; pending again once it ran out.
    let later = store
        .note_pending(unseal, "n", "10.0.0.1", 150, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(later.state, ApprovalState::Approved);
    let expired = store
        .note_pending(unseal, "n", "10.0.0.1", 250, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (expired.id, expired.state),
        (first.id, ApprovalState::Pending)
    );

    let denied = store
        .decide(elsewhere.id, Decision::Deny, 260, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(denied.state, ApprovalState::Denied);
    let still = store
        .note_pending(unseal, "n", "10.0.0.2", 300, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(still.state, ApprovalState::Denied, "a denial stays");
    assert_eq!(
        store
            .decide(999_999, Decision::Deny, 1, None)
            .await
            .unwrap(),
        None
    );

    let pending = store.approvals(Some(ApprovalState::Pending)).await.unwrap();
    let ids: Vec<_> = pending.iter().map(|a| a.id).collect();
    assert_eq!(ids, [first.id, sealing.id], "oldest first");
    assert_eq!(store.approvals(None).await.unwrap().len(), 3);

    // A full table records no more new requests, but still counts known ones.
    assert_eq!(
        store
            .note_pending(unseal, "m", "10.0.0.9", 300, 2)
            .await
            .unwrap(),
        None
    );
    assert!(
        store
            .note_pending(unseal, "n", "10.0.0.1", 300, 2)
            .await
            .unwrap()
            .is_some()
    );
}

/// A purged id never comes back: an old audit line's `record` or a `keys revoke` taken from
/// it must not name another node's record.
pub async fn record_ids_are_never_reused(store: &dyn Store) {
    let stored = |inserted| match inserted {
        Inserted::Stored(id, _) => id,
        other => panic!("fresh nonces are free: {other:?}"),
    };
    let first = stored(
        store
            .insert(record(1, "node-i", "10.0.2.1", 1_000), NodeLimits::NONE)
            .await
            .unwrap(),
    );
    let newest = stored(
        store
            .insert(record(2, "node-i", "10.0.2.2", 1_000), NodeLimits::NONE)
            .await
            .unwrap(),
    );
    let everything = RecordFilter::default();
    assert_eq!(store.delete(&[newest], &everything).await.unwrap(), 1);
    let next = stored(
        store
            .insert(record(3, "node-j", "10.0.2.3", 1_000), NodeLimits::NONE)
            .await
            .unwrap(),
    );
    assert!(
        next > newest,
        "id {next} after purging {newest} (first was {first})"
    );
}

/// A row the store cannot read (a state this build does not know, as a newer version or a
/// hand edit leaves) is an error wherever a call meets it: never taken for "no approval",
/// nor for "the pending limit is reached". `spoil` writes the unknown state into the row
/// with the id it is given, behind the store's back.
pub async fn an_unreadable_approval_is_an_error<F: std::future::Future<Output = ()>>(
    store: &dyn Store,
    spoil: impl FnOnce(i64) -> F,
) {
    let unseal = Operation::Unseal;
    let noted = store
        .note_pending(unseal, "n", "10.0.0.1", 100, 10)
        .await
        .unwrap()
        .unwrap();
    spoil(noted.id).await;
    let named = |refused: talos_kms_server::store::StoreError| {
        let text = refused.to_string();
        assert!(
            text.contains("approvals") && text.contains("\"expired\""),
            "{text}"
        );
    };
    named(store.approval(unseal, "n", "10.0.0.1").await.unwrap_err());
    named(store.approvals(None).await.unwrap_err());
    // The next refused call of that node is refused for the row, not for a full queue (SQLite
    // may already refuse to write the unknown state back).
    assert!(
        store
            .note_pending(unseal, "n", "10.0.0.1", 130, 10)
            .await
            .is_err()
    );
}

fn binding(fingerprint: u8, scheme: &str, node: &str, ip: &str, at: i64) -> NewBinding {
    NewBinding {
        fingerprint: [fingerprint; 32],
        scheme: scheme.into(),
        node_uuid: node.into(),
        ip: ip.into(),
        at,
        tag: None,
    }
}

/// A foreign blob is bound once, to its first caller: a second first unseal (another
/// replica, a race) gets the binding that holds; bindings are listed, filtered, used and
/// revoked like records, and never mixed with them.
pub async fn foreign_blobs_are_bound_once(store: &dyn Store) {
    let everything = RecordFilter::default();
    assert!(store.binding(&[1; 32]).await.unwrap().is_none());
    assert!(store.bindings(&everything, 0, 10).await.unwrap().is_empty());

    let first = store
        .bind(binding(1, "gustinn", "node-f", "10.0.3.1", 1_000))
        .await
        .unwrap();
    assert_eq!(first.scheme, "gustinn");
    assert_eq!(
        (first.info.node_uuid.as_str(), first.info.ip.as_str()),
        ("node-f", "10.0.3.1")
    );
    assert_eq!(
        (
            first.info.created_at,
            first.info.last_access,
            first.info.revoked_at
        ),
        (1_000, None, None)
    );
    let raced = store
        .bind(binding(1, "gustinn", "node-x", "10.0.3.9", 2_000))
        .await
        .unwrap();
    assert_eq!(raced, first, "the first binding holds");
    assert_eq!(store.binding(&[1; 32]).await.unwrap(), Some(first.clone()));

    let second = store
        .bind(binding(2, "sidero-reference", "node-g", "10.0.3.2", 1_500))
        .await
        .unwrap();
    assert!(second.info.id > first.info.id);
    store.binding_used(first.info.id, 3_000).await.unwrap();
    let used = store.binding(&[1; 32]).await.unwrap().unwrap();
    assert_eq!(used.info.last_access, Some(3_000));

    let listed = store.bindings(&everything, 0, 10).await.unwrap();
    assert_eq!(listed, [used.clone(), second.clone()]);
    let page = store
        .bindings(&everything, first.info.id, 10)
        .await
        .unwrap();
    assert_eq!(
        page,
        std::slice::from_ref(&second),
        "a page starts after its id"
    );
    let of_node = RecordFilter {
        node_uuid: Some("node-g".into()),
        ..RecordFilter::default()
    };
    assert_eq!(
        store.bindings(&of_node, 0, 10).await.unwrap(),
        std::slice::from_ref(&second)
    );
    assert!(
        store.list(&everything, 0, 10).await.unwrap().is_empty(),
        "bindings are not records"
    );

    let ids = [(first.info.id, None), (second.info.id, None)];
    assert_eq!(
        store.set_bindings_revoked(&ids, Some(4_000)).await.unwrap(),
        2
    );
    assert_eq!(
        store.set_bindings_revoked(&ids, Some(5_000)).await.unwrap(),
        0
    );
    let revoked = RecordFilter {
        state: Some(RecordState::Revoked),
        ..RecordFilter::default()
    };
    assert_eq!(store.bindings(&revoked, 0, 10).await.unwrap().len(), 2);
    assert_eq!(
        store
            .binding(&[2; 32])
            .await
            .unwrap()
            .unwrap()
            .info
            .revoked_at,
        Some(4_000)
    );
    assert_eq!(
        store
            .set_bindings_revoked(&[(second.info.id, None)], None)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.bindings(&revoked, 0, 10).await.unwrap(),
        [Binding {
            info: RecordInfo {
                revoked_at: Some(4_000),
                ..used.info
            },
            ..used
        }]
    );
}
