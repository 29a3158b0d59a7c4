//! The store as the service, the policy and the admin commands see it when a key source is
//! configured: records are wrapped under the current data key on their way in and opened on
//! their way out, and every row the policy trusts is tagged when written and checked when
//! read. The store below holds only bytes it can neither read nor forge.
//!
//! A row that fails its check is answered as an unknown record (a record), a revoked one (a
//! binding), a pending request (an approval) or a closed window: never a passphrase, an
//! approval or an open window. Each is named once in the log and counted in metrics.

use super::keyring::{
    self, ALL_WRAPPED, Keyring, approval_fields, approval_is_decided, binding_fields,
    record_fields, window_fields,
};
use super::{CustodyError, Envelope, RecordBinding, Root};
use crate::locking::lock;
use crate::metrics::Metrics;
use crate::sealing::SealNonce;
use crate::store::{
    Approval, ApprovalId, ApprovalState, Binding, BindingId, Custody, CustodyChange, Decision,
    Fingerprint, ImportBatch, ImportReport, Inserted, NewBinding, NewRecord, NodeLimits, Operation,
    Record, RecordFilter, RecordId, RecordInfo, Retag, Rewrapped, Store, StoreError, StoredRecord,
    TaggedTable, UnixTime, Window,
};
use async_trait::async_trait;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Records re-wrapped per store write: small enough that unseals queued behind it wait
/// milliseconds.
const REWRAP_BATCH: usize = 256;
/// How often a server looks for data keys added meanwhile (`keys rotate-data-key`, another
/// replica), which start a pass over the records.
const IDLE_CHECK: Duration = Duration::from_secs(10);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

pub struct Custodian {
    store: Arc<dyn Store>,
    /// `None` while sealed (shamir, before the shares came).
    keyring: RwLock<Option<Arc<Keyring>>>,
    /// The root, kept to unwrap data keys other servers or commands add.
    root: Mutex<Option<Arc<Root>>>,
    all_wrapped: AtomicBool,
    metrics: Arc<Metrics>,
    reported: Mutex<HashSet<(&'static str, i64)>>,
    stopping: AtomicBool,
    root_rotated: AtomicBool,
    /// A pass over the records is due: at start, and when the data keys changed. Between
    /// them every record written is wrapped under the current key, so an idle server does
    /// not scan a million records every few seconds.
    pass_wanted: AtomicBool,
    /// An admin command's custodian of a shamir source: never unsealed, and says why.
    keys_in_server: AtomicBool,
    wake: tokio::sync::Notify,
}

impl Custodian {
    /// A custodian over `store`, sealed until [`Custodian::unseal`] gives it the root.
    pub fn sealed(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Arc<Custodian> {
        metrics.custody_sealed(true);
        Arc::new(Custodian {
            store,
            keyring: RwLock::new(None),
            root: Mutex::new(None),
            all_wrapped: AtomicBool::new(false),
            metrics,
            reported: Mutex::new(HashSet::new()),
            stopping: AtomicBool::new(false),
            root_rotated: AtomicBool::new(false),
            pass_wanted: AtomicBool::new(true),
            keys_in_server: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// A custodian holding the data keys `root` unwraps; the first one is made when the
    /// database has none (and no wrapped record).
    pub async fn open(
        store: Arc<dyn Store>,
        root: Root,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Custodian>, CustodyError> {
        let custodian = Custodian::sealed(store, metrics);
        custodian.unseal(root).await?;
        Ok(custodian)
    }

    /// Unwraps the data keys under `root` and starts answering.
    pub async fn unseal(&self, root: Root) -> Result<(), CustodyError> {
        let mut values = self.store.custody_values().await?;
        let mut keyring = Keyring::unwrap_all(&root, &values)?;
        if keyring.is_empty() {
            let wrapped = self.store.key_versions().await?;
            if wrapped.iter().any(|(version, _)| version.is_some())
                || values.iter().any(|(name, _)| name == ALL_WRAPPED)
            {
                return Err(CustodyError::Source(
                    "the database holds wrapped records but none of their data keys (its \
                     custody table was emptied or replaced): restore the database from a \
                     backup; it is never served as if empty"
                        .into(),
                ));
            }
            let (version, (name, value)) = keyring.add_version(&root)?;
            let value = value.expect("a new data key has a value");
            let adopting = (ADOPTING.to_string(), keyring.tag(&adopting_fields()));
            if self
                .store
                .add_custody_values(vec![(name, value), adopting])
                .await?
            {
                tracing::info!(
                    version,
                    "made the first data key; records are wrapped from now on"
                );
            } else {
                // Another replica made it first: its key is the one.
                tracing::info!(version, "another server made the first data key; using it");
            }
            values = self.store.custody_values().await?;
            keyring = Keyring::unwrap_all(&root, &values)?;
            if keyring.is_empty() {
                return Err(CustodyError::Source(
                    "the first data key could not be made: the database's custody table holds \
                     a value of its name but no key; restore the database from a backup"
                        .into(),
                ));
            }
        }
        // Untagged rows are trusted only while a genuine value says that rows from before
        // custody are still to be adopted: the absence of a value proves nothing.
        let adopting = values
            .iter()
            .find(|(name, _)| name == ADOPTING)
            .is_some_and(|(_, tag)| keyring.verify(&adopting_fields(), Some(tag)).is_ok());
        self.all_wrapped.store(!adopting, Ordering::Release);
        *lock(&self.root) = Some(Arc::new(root));
        *self.keyring.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(keyring));
        self.metrics.custody_sealed(false);
        self.wake.notify_one();
        Ok(())
    }

    pub fn is_sealed(&self) -> bool {
        self.keys().is_err()
    }

    /// The data key versions held, newest last.
    pub fn versions(&self) -> Vec<u32> {
        self.keys().map(|k| k.versions()).unwrap_or_default()
    }

    fn destroyed_count(&self) -> usize {
        self.keys().map(|k| k.destroyed_count()).unwrap_or_default()
    }

    fn keys(&self) -> Result<Arc<Keyring>, StoreError> {
        self.keyring
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                if self.keys_in_server.load(Ordering::Relaxed) {
                    StoreError::KeysInServer
                } else {
                    StoreError::Sealed
                }
            })
    }

    /// For an admin command beside a shamir server, which holds the only copy of the keys.
    pub fn keys_in_server(&self) {
        self.keys_in_server.store(true, Ordering::Relaxed);
    }

    /// Names a row that failed its check, once per row, and counts it.
    fn forged(&self, table: &'static str, id: i64, why: &CustodyError) {
        if let CustodyError::Shredded(version) = why {
            if lock(&self.reported).insert((table, id)) {
                tracing::warn!(
                    table,
                    id,
                    version,
                    "record unreadable for good: its data key was destroyed"
                );
            }
            return;
        }
        if lock(&self.reported).insert((table, id)) {
            self.metrics.custody_forged_row(table);
            tracing::error!(table, id, problem = %why,
                "a row failed its authentication: it was changed behind the server's back (or \
                 written under another key) and is not trusted; `db verify` lists every such \
                 row");
        }
    }

    /// The sealing ciphertext of a stored record, after checking its tag and envelope.
    fn open_stored(
        &self,
        keys: &Keyring,
        nonce: &[u8],
        info: (&str, &str, Option<UnixTime>),
        ciphertext: &[u8],
        tag: Option<&[u8]>,
    ) -> Result<Vec<u8>, CustodyError> {
        let (node_uuid, ip, revoked_at) = info;
        let binding = RecordBinding {
            record_id: nonce,
            node_uuid,
            ip,
        };
        if keyring::is_wrapped(ciphertext) {
            let version = Envelope::parse(ciphertext)?.version;
            if keys.is_destroyed(version) {
                return Err(CustodyError::Shredded(version));
            }
            record_fields(nonce, node_uuid, ip, revoked_at, Some(version), |fields| {
                keys.verify(fields, tag)
            })?;
            return keys.open_record(&binding, ciphertext);
        }
        if self.all_wrapped.load(Ordering::Acquire) {
            return Err(CustodyError::Forged(
                "record (not wrapped, though every record was)",
            ));
        }
        // From before custody: nothing to check unless custody changed it since.
        if tag.is_some() {
            record_fields(nonce, node_uuid, ip, revoked_at, None, |fields| {
                keys.verify(fields, tag)
            })?;
        }
        Ok(ciphertext.to_vec())
    }

    fn open_exported(
        &self,
        keys: &Keyring,
        record: &StoredRecord,
    ) -> Result<Vec<u8>, CustodyError> {
        self.open_stored(
            keys,
            &record.nonce,
            (
                &record.info.node_uuid,
                &record.info.ip,
                record.info.revoked_at,
            ),
            &record.ciphertext,
            record.custody.tag.as_deref(),
        )
    }

    /// A record as stored under custody: wrapped under the current key and tagged.
    fn wrap(&self, keys: &Keyring, mut record: NewRecord) -> Result<NewRecord, StoreError> {
        let binding = RecordBinding {
            record_id: &record.nonce,
            node_uuid: &record.node_uuid,
            ip: &record.ip,
        };
        let (version, envelope) = keys
            .wrap_record(&binding, &record.ciphertext)
            .map_err(|e| StoreError::Write(e.to_string()))?;
        let tag = record_fields(
            &record.nonce,
            &record.node_uuid,
            &record.ip,
            None,
            Some(version),
            |fields| keys.tag(fields),
        );
        record.ciphertext = envelope;
        record.custody = Custody {
            key_version: Some(version),
            tag: Some(tag),
        };
        Ok(record)
    }

    /// Whether a row with no tag is from before custody, and trusted as it was then.
    fn untagged_trusted(&self, tag: &Option<Vec<u8>>) -> bool {
        tag.is_none() && !self.all_wrapped.load(Ordering::Acquire)
    }

    fn trusted_approval(&self, keys: &Keyring, mut approval: Approval) -> Approval {
        if approval_is_decided(&approval)
            && !self.untagged_trusted(&approval.tag)
            && let Err(why) = approval_fields(&approval, |fields| {
                keys.verify(fields, approval.tag.as_deref())
            })
        {
            self.forged("approvals", approval.id, &why);
            approval.state = ApprovalState::Pending;
            approval.approved_until = None;
        }
        approval
    }

    fn trusted_binding(&self, keys: &Keyring, mut binding: Binding) -> Binding {
        if !self.untagged_trusted(&binding.tag)
            && let Err(why) = binding_fields(&binding, |fields| {
                keys.verify(fields, binding.tag.as_deref())
            })
        {
            self.forged("foreign_bindings", binding.info.id, &why);
            binding.info.revoked_at = Some(binding.info.revoked_at.unwrap_or(0));
        }
        binding
    }

    /// Every row that fails its check, for `db verify`: (table, id, why).
    pub async fn verify_all(&self) -> Result<Vec<(&'static str, i64, String)>, StoreError> {
        let keys = self.keys()?;
        let mut found = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .store
                .export(&RecordFilter::default(), after, 1024)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.info.id;
            for record in &page {
                if let Err(why) = self.open_exported(&keys, record) {
                    found.push(("records", record.info.id, why.to_string()));
                }
            }
        }
        for approval in self.store.approvals(None).await? {
            if approval_is_decided(&approval)
                && !self.untagged_trusted(&approval.tag)
                && let Err(why) =
                    approval_fields(&approval, |f| keys.verify(f, approval.tag.as_deref()))
            {
                found.push(("approvals", approval.id, why.to_string()));
            }
        }
        for window in self.store.windows().await? {
            if self.untagged_trusted(&window.tag) {
                continue;
            }
            if let Err(why) = window_fields(&window, |f| keys.verify(f, window.tag.as_deref())) {
                found.push(("windows", 0, format!("{} window: {why}", window.operation)));
            }
        }
        let mut after = 0;
        loop {
            let page = self
                .store
                .bindings(&RecordFilter::default(), after, 1024)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.info.id;
            for binding in page.iter().filter(|b| !self.untagged_trusted(&b.tag)) {
                if let Err(why) =
                    binding_fields(binding, |f| keys.verify(f, binding.tag.as_deref()))
                {
                    found.push(("foreign_bindings", binding.info.id, why.to_string()));
                }
            }
        }
        Ok(found)
    }

    /// Wraps, in the background, every record not under the current data key, then keeps
    /// looking (rotation, data keys added by other servers) until [`Store::close`].
    pub fn spawn_rewrap(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let custodian = Arc::clone(self);
        tokio::spawn(async move {
            while !custodian.stopping.load(Ordering::Acquire) {
                if !custodian.is_sealed() {
                    if let Err(e) = custodian.reload_keys().await {
                        tracing::warn!(error = %e, "could not read the data keys; retrying");
                    } else if custodian.pass_wanted.swap(false, Ordering::AcqRel)
                        && let Err(e) = custodian.rewrap_pass().await
                    {
                        custodian.pass_wanted.store(true, Ordering::Release);
                        tracing::warn!(error = %e, "wrapping records paused; retrying");
                    }
                }
                let _ = tokio::time::timeout(IDLE_CHECK, custodian.wake.notified()).await;
            }
        })
    }

    /// Picks up data keys added meanwhile (`keys rotate-data-key`, another replica).
    async fn reload_keys(&self) -> Result<(), CustodyError> {
        let Some(root) = lock(&self.root).clone() else {
            return Ok(());
        };
        let values = self.store.custody_values().await?;
        let keyring = match Keyring::unwrap_all(&root, &values) {
            Err(CustodyError::WrongRoot { .. }) => {
                // `keys rotate-root`: what this server holds still opens every record.
                if !self.root_rotated.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        "the data keys were re-wrapped under another key source \
                        (`keys rotate-root`): serving on with the keys held; restart with the \
                        new keySource to pick up data keys made after this"
                    );
                }
                return Ok(());
            }
            other => other?,
        };
        if keyring.is_empty() {
            return Ok(());
        }
        let known = self.versions();
        if keyring.versions() != known || keyring.destroyed_count() != self.destroyed_count() {
            tracing::info!(versions = ?keyring.versions(), "data keys changed");
            *self.keyring.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(keyring));
            self.pass_wanted.store(true, Ordering::Release);
        }
        Ok(())
    }

    async fn rewrap_pass(&self) -> Result<(), StoreError> {
        let keys = self.keys()?;
        let current = keys.current().map(|k| k.version()).unwrap_or_default();
        let versions = self.store.key_versions().await?;
        let remaining = |versions: &[(Option<u32>, u64)]| -> u64 {
            versions
                .iter()
                .filter(|(version, _)| {
                    *version != Some(current) && !version.is_some_and(|v| keys.is_destroyed(v))
                })
                .map(|(_, count)| count)
                .sum()
        };
        let mut left = remaining(&versions);
        self.metrics.custody_records(&versions, left);
        if left > 0 {
            tracing::info!(
                records = left,
                version = current,
                "wrapping records under the current data key, while serving"
            );
        }
        let filter = RecordFilter {
            key_version_other_than: Some(current),
            ..RecordFilter::default()
        };
        let (mut after, mut written, mut said) = (0, 0u64, Instant::now());
        while left > 0 && !self.stopping.load(Ordering::Acquire) {
            let page = self.store.export(&filter, after, REWRAP_BATCH).await?;
            let Some(last) = page.last() else { break };
            after = last.info.id;
            let rows: Vec<Rewrapped> = page
                .iter()
                .filter_map(|record| self.rewrapped(&keys, record))
                .collect();
            written += self.store.rewrap(&rows).await?;
            self.metrics
                .custody_records(&versions, left.saturating_sub(written));
            if said.elapsed() >= PROGRESS_EVERY {
                said = Instant::now();
                tracing::info!(wrapped = written, of = left, "wrapping records");
            }
        }
        if written > 0 {
            tracing::info!(wrapped = written, version = current, "records wrapped");
        }
        let versions = self.store.key_versions().await?;
        left = remaining(&versions);
        self.metrics.custody_records(&versions, left);
        let unwrapped = versions.iter().any(|(version, _)| version.is_none());
        if !unwrapped && !self.all_wrapped.load(Ordering::Acquire) {
            self.adopt_untagged_rows(&keys).await?;
            let tag = keys.tag(&all_wrapped_fields());
            self.store
                .set_custody_values(vec![
                    (ALL_WRAPPED.to_string(), Some(tag)),
                    (ADOPTING.to_string(), None),
                ])
                .await?;
            self.all_wrapped.store(true, Ordering::Release);
            tracing::info!("every record is wrapped: an unwrapped one is refused from now on");
        }
        Ok(())
    }

    /// Tags the windows, decisions and bindings written before custody was configured,
    /// as they are: from now on an untagged one is a forgery.
    async fn adopt_untagged_rows(&self, keys: &Keyring) -> Result<(), StoreError> {
        for mut window in self.store.windows().await? {
            if window.tag.is_none() {
                window.tag = Some(window_fields(&window, |fields| keys.tag(fields)));
                self.store.open_window(window).await?;
            }
        }
        let approvals: Vec<Retag> = self
            .store
            .approvals(None)
            .await?
            .iter()
            .filter(|approval| approval.tag.is_none() && approval_is_decided(approval))
            .map(|approval| {
                (
                    approval.id,
                    Some(approval_fields(approval, |f| keys.tag(f))),
                )
            })
            .collect();
        self.store.retag(TaggedTable::Approvals, &approvals).await?;
        let mut after = 0;
        loop {
            let page = self
                .store
                .bindings(&RecordFilter::default(), after, 1024)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.info.id;
            let untagged: Vec<Retag> = page
                .iter()
                .filter(|binding| binding.tag.is_none())
                .map(|binding| {
                    (
                        binding.info.id,
                        Some(binding_fields(binding, |f| keys.tag(f))),
                    )
                })
                .collect();
            self.store
                .retag(TaggedTable::ForeignBindings, &untagged)
                .await?;
        }
        Ok(())
    }

    fn rewrapped(&self, keys: &Keyring, record: &StoredRecord) -> Option<Rewrapped> {
        let plain = match self.open_exported(keys, record) {
            Ok(plain) => zeroize::Zeroizing::new(plain),
            Err(why) => {
                self.forged("records", record.info.id, &why);
                return None;
            }
        };
        let binding = RecordBinding {
            record_id: &record.nonce,
            node_uuid: &record.info.node_uuid,
            ip: &record.info.ip,
        };
        let (version, ciphertext) = keys.wrap_record(&binding, &plain).ok()?;
        let tag = record_fields(
            &record.nonce,
            &record.info.node_uuid,
            &record.info.ip,
            record.info.revoked_at,
            Some(version),
            |fields| keys.tag(fields),
        );
        Some(Rewrapped {
            id: record.info.id,
            was: record.ciphertext.clone(),
            revoked_at: record.info.revoked_at,
            ciphertext,
            key_version: version,
            tag,
        })
    }

    /// Tags for records' new revocation state, read from the rows themselves.
    async fn record_retags(
        &self,
        keys: &Keyring,
        ids: &[Retag],
        revoked_at: Option<UnixTime>,
    ) -> Result<Vec<Retag>, StoreError> {
        let filter = RecordFilter {
            ids: Some(ids.iter().map(|(id, _)| *id).collect()),
            ..RecordFilter::default()
        };
        let rows = self.store.export(&filter, 0, ids.len()).await?;
        Ok(rows
            .iter()
            .filter_map(|record| {
                // A forged row keeps failing: revoking it must not make it trusted.
                self.open_exported(keys, record)
                    .map_err(|why| self.forged("records", record.info.id, &why))
                    .ok()?;
                let version = keyring::is_wrapped(&record.ciphertext)
                    .then(|| Envelope::parse(&record.ciphertext).ok().map(|e| e.version))
                    .flatten();
                let tag = record_fields(
                    &record.nonce,
                    &record.info.node_uuid,
                    &record.info.ip,
                    revoked_at,
                    version,
                    |fields| keys.tag(fields),
                );
                Some((record.info.id, Some(tag)))
            })
            .collect())
    }

    /// A new data key version, made with the root this server holds (a shamir source's
    /// root exists nowhere else); new seals use it at once.
    pub async fn rotate_data_key(&self) -> Result<u32, CustodyError> {
        let root = lock(&self.root).clone().ok_or(StoreError::Sealed)?;
        let version = super::rotation::rotate_data_key(self.store.as_ref(), &root).await?;
        self.reload_keys().await?;
        self.wake.notify_one();
        Ok(version)
    }

    /// Destroys a data key version with the root this server holds (see
    /// [`super::rotation::destroy_data_key`]).
    pub async fn destroy_data_key(
        &self,
        version: u32,
        shred: bool,
    ) -> Result<super::rotation::Destroyed, CustodyError> {
        let root = lock(&self.root).clone().ok_or(StoreError::Sealed)?;
        let destroyed =
            super::rotation::destroy_data_key(self.store.as_ref(), &root, version, shred).await?;
        self.reload_keys().await?;
        Ok(destroyed)
    }

    /// Re-wraps the data keys under `new`, which this server holds from then on.
    pub async fn rotate_root(&self, new: Root) -> Result<Vec<u32>, CustodyError> {
        let old = lock(&self.root).clone().ok_or(StoreError::Sealed)?;
        let versions = super::rotation::rotate_root(self.store.as_ref(), &old, &new).await?;
        *lock(&self.root) = Some(Arc::new(new));
        Ok(versions)
    }

    /// Stops the background wrapping; what it wrote is durable, what it did not is done
    /// by the next start.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

fn all_wrapped_fields() -> [&'static [u8]; 1] {
    [b"every record wrapped v1"]
}

/// Stored with the first data key, removed once the rows from before custody are tagged.
const ADOPTING: &str = "adopting-untagged-rows";

fn adopting_fields() -> [&'static [u8]; 1] {
    [b"adopting untagged rows v1"]
}

#[async_trait]
impl Store for Custodian {
    async fn insert(&self, record: NewRecord, limits: NodeLimits) -> Result<Inserted, StoreError> {
        let keys = self.keys()?;
        self.store.insert(self.wrap(&keys, record)?, limits).await
    }

    async fn find_by_nonce(&self, nonce: &SealNonce) -> Result<Option<Record>, StoreError> {
        let keys = self.keys()?;
        let Some(mut record) = self.store.find_by_nonce(nonce).await? else {
            return Ok(None);
        };
        match self.open_stored(
            &keys,
            nonce,
            (&record.node_uuid, &record.ip, record.revoked_at),
            &record.ciphertext,
            record.custody.tag.as_deref(),
        ) {
            Ok(plain) => {
                record.ciphertext = plain;
                Ok(Some(record))
            }
            Err(why) => {
                self.forged("records", record.id, &why);
                Ok(None)
            }
        }
    }

    fn record_access(&self, id: RecordId, at: UnixTime) {
        self.store.record_access(id, at);
    }

    async fn import(&self, mut batch: ImportBatch) -> Result<ImportReport, StoreError> {
        let keys = self.keys()?;
        batch.records = std::mem::take(&mut batch.records)
            .into_iter()
            .map(|record| self.wrap(&keys, record))
            .collect::<Result<_, _>>()?;
        self.store.import(batch).await
    }

    async fn has_imported(&self, fingerprint: &str) -> Result<bool, StoreError> {
        self.store.has_imported(fingerprint).await
    }

    async fn count(&self) -> Result<u64, StoreError> {
        self.store.count().await
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.keys()?;
        self.store.health().await
    }

    async fn list(
        &self,
        filter: &RecordFilter,
        after: RecordId,
        limit: usize,
    ) -> Result<Vec<RecordInfo>, StoreError> {
        self.store.list(filter, after, limit).await
    }

    /// Records opened: what leaves through here (`export-json`) is the legacy format. A
    /// row that fails its check is left out, and named; a page is still full unless the
    /// records ran out, as callers page on.
    async fn export(
        &self,
        filter: &RecordFilter,
        after: RecordId,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let keys = self.keys()?;
        let mut opened = Vec::with_capacity(limit);
        let mut cursor = after;
        while opened.len() < limit {
            let wanted = limit - opened.len();
            let page = self.store.export(filter, cursor, wanted).await?;
            let Some(last) = page.last() else { break };
            cursor = last.info.id;
            let ran_out = page.len() < wanted;
            for mut record in page {
                match self.open_exported(&keys, &record) {
                    Ok(plain) => {
                        record.ciphertext = plain;
                        record.custody = Custody::default();
                        opened.push(record);
                    }
                    Err(why) => self.forged("records", record.info.id, &why),
                }
            }
            if ran_out {
                break;
            }
        }
        Ok(opened)
    }

    async fn set_revoked(
        &self,
        ids: &[Retag],
        revoked_at: Option<UnixTime>,
    ) -> Result<u64, StoreError> {
        let keys = self.keys()?;
        let tagged = self.record_retags(&keys, ids, revoked_at).await?;
        self.store.set_revoked(&tagged, revoked_at).await
    }

    async fn rewrap(&self, rows: &[Rewrapped]) -> Result<u64, StoreError> {
        self.store.rewrap(rows).await
    }

    async fn key_versions(&self) -> Result<Vec<(Option<u32>, u64)>, StoreError> {
        self.store.key_versions().await
    }

    async fn retag(&self, table: TaggedTable, rows: &[Retag]) -> Result<(), StoreError> {
        self.store.retag(table, rows).await
    }

    async fn custody_values(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.store.custody_values().await
    }

    async fn add_custody_values(&self, values: Vec<(String, Vec<u8>)>) -> Result<bool, StoreError> {
        self.store.add_custody_values(values).await
    }

    async fn set_custody_values(&self, changes: Vec<CustodyChange>) -> Result<(), StoreError> {
        self.store.set_custody_values(changes).await
    }

    async fn delete(&self, ids: &[RecordId], filter: &RecordFilter) -> Result<u64, StoreError> {
        self.store.delete(ids, filter).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.store.flush().await
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.stop();
        self.store.close().await
    }

    async fn created_since(&self, since: UnixTime) -> Result<u64, StoreError> {
        self.store.created_since(since).await
    }

    async fn windows(&self) -> Result<Vec<Window>, StoreError> {
        let keys = self.keys()?;
        let mut windows = self.store.windows().await?;
        windows.retain(|window| {
            self.untagged_trusted(&window.tag)
                || window_fields(window, |fields| keys.verify(fields, window.tag.as_deref()))
                    .map_err(|why| {
                        let id = match window.operation {
                            Operation::Seal => 1,
                            Operation::Unseal => 2,
                        };
                        self.forged("windows", id, &why);
                    })
                    .is_ok()
        });
        Ok(windows)
    }

    async fn open_window(&self, mut window: Window) -> Result<(), StoreError> {
        let keys = self.keys()?;
        window.tag = Some(window_fields(&window, |fields| keys.tag(fields)));
        self.store.open_window(window).await
    }

    async fn close_window(&self, operation: Operation) -> Result<bool, StoreError> {
        self.store.close_window(operation).await
    }

    async fn approval(
        &self,
        operation: Operation,
        node_uuid: &str,
        ip: &str,
    ) -> Result<Option<Approval>, StoreError> {
        let keys = self.keys()?;
        Ok(self
            .store
            .approval(operation, node_uuid, ip)
            .await?
            .map(|approval| self.trusted_approval(&keys, approval)))
    }

    async fn note_pending(
        &self,
        operation: Operation,
        node_uuid: &str,
        ip: &str,
        at: UnixTime,
        max_pending: u64,
    ) -> Result<Option<Approval>, StoreError> {
        let keys = self.keys()?;
        Ok(self
            .store
            .note_pending(operation, node_uuid, ip, at, max_pending)
            .await?
            .map(|approval| self.trusted_approval(&keys, approval)))
    }

    async fn approvals(&self, state: Option<ApprovalState>) -> Result<Vec<Approval>, StoreError> {
        self.store.approvals(state).await
    }

    async fn decide(
        &self,
        id: ApprovalId,
        decision: Decision,
        at: UnixTime,
        _tag: Option<Vec<u8>>,
    ) -> Result<Option<Approval>, StoreError> {
        let keys = self.keys()?;
        let Some(mut decided) = self
            .store
            .approvals(None)
            .await?
            .into_iter()
            .find(|approval| approval.id == id)
        else {
            return Ok(None);
        };
        // Operation, node and address never change after a request is noted.
        (decided.state, decided.approved_until) = match decision {
            Decision::Approve { until } => (ApprovalState::Approved, Some(until)),
            Decision::Deny => (ApprovalState::Denied, None),
        };
        let tag = approval_fields(&decided, |fields| keys.tag(fields));
        self.store.decide(id, decision, at, Some(tag)).await
    }

    async fn copy_records(&self, records: &[StoredRecord]) -> Result<u64, StoreError> {
        self.store.copy_records(records).await
    }

    async fn copy_approvals(&self, approvals: &[Approval]) -> Result<u64, StoreError> {
        self.store.copy_approvals(approvals).await
    }

    async fn binding(&self, fingerprint: &Fingerprint) -> Result<Option<Binding>, StoreError> {
        let keys = self.keys()?;
        Ok(self
            .store
            .binding(fingerprint)
            .await?
            .map(|binding| self.trusted_binding(&keys, binding)))
    }

    async fn bind(&self, mut binding: NewBinding) -> Result<Binding, StoreError> {
        let keys = self.keys()?;
        let as_bound = Binding {
            fingerprint: binding.fingerprint,
            scheme: binding.scheme.clone(),
            info: RecordInfo {
                id: 0,
                node_uuid: binding.node_uuid.clone(),
                ip: binding.ip.clone(),
                created_at: binding.at,
                last_access: None,
                revoked_at: None,
            },
            tag: None,
        };
        binding.tag = Some(binding_fields(&as_bound, |fields| keys.tag(fields)));
        let bound = self.store.bind(binding).await?;
        Ok(self.trusted_binding(&keys, bound))
    }

    async fn binding_used(&self, id: BindingId, at: UnixTime) -> Result<(), StoreError> {
        self.store.binding_used(id, at).await
    }

    async fn bindings(
        &self,
        filter: &RecordFilter,
        after: BindingId,
        limit: usize,
    ) -> Result<Vec<Binding>, StoreError> {
        self.store.bindings(filter, after, limit).await
    }

    async fn set_bindings_revoked(
        &self,
        ids: &[Retag],
        revoked_at: Option<UnixTime>,
    ) -> Result<u64, StoreError> {
        let keys = self.keys()?;
        let filter = RecordFilter {
            ids: Some(ids.iter().map(|(id, _)| *id).collect()),
            ..RecordFilter::default()
        };
        let tagged: Vec<Retag> = self
            .store
            .bindings(&filter, 0, ids.len())
            .await?
            .into_iter()
            .filter(|binding| {
                self.untagged_trusted(&binding.tag)
                    || binding_fields(binding, |f| keys.verify(f, binding.tag.as_deref()))
                        .map_err(|why| self.forged("foreign_bindings", binding.info.id, &why))
                        .is_ok()
            })
            .map(|mut binding| {
                binding.info.revoked_at = revoked_at;
                let tag = binding_fields(&binding, |fields| keys.tag(fields));
                (binding.info.id, Some(tag))
            })
            .collect();
        self.store.set_bindings_revoked(&tagged, revoked_at).await
    }
}
