//! A sealed server gathering operators' key shares (`keySource: shamir`). Each share is
//! checked as it comes, so that a wrong one is named at once and the good ones are kept; the
//! threshold's worth rebuilds the root key, which must unwrap the database's data keys before
//! the server answers a node.

use super::shamir::{self, Share};
use super::{Custodian, CustodyError, Root, SecretKey};
use crate::metrics::Metrics;
use crate::store::Store;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use zeroize::Zeroizing;

/// What must happen with the keys before nodes are answered (the legacy take-over: a node
/// whose record is still only in the legacy file must not be told it has none). It is given
/// the store under a custodian of its own, already unsealed.
pub type BeforeServing = Box<
    dyn Fn(Arc<dyn Store>) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

pub struct Unsealing {
    custodian: Arc<Custodian>,
    /// The store below the custodian, for [`BeforeServing`].
    below: Arc<dyn Store>,
    threshold: u8,
    /// How many shares a new root is split into.
    shares: u8,
    before_serving: Option<BeforeServing>,
    state: tokio::sync::Mutex<State>,
}

enum State {
    Gathering(Vec<Given>),
    Unsealed,
}

/// A share accepted so far: what its checks need, and its text for the rebuild.
struct Given {
    index: u8,
    set: [u8; 8],
    text: Zeroizing<String>,
}

/// The answer to one request, as one line: `accepted: ...`, `unsealed: ...`,
/// `sealed: ...` (a status) or `refused: ...`. None holds a share.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Accepted(String),
    Unsealed(String),
    Sealed(String),
    Refused(String),
    /// A rotation done; `shares` (new shares, shown once) go to the caller only.
    Rotated {
        said: String,
        shares: Vec<Zeroizing<String>>,
    },
}

impl Answer {
    pub fn line(&self) -> String {
        match self {
            Answer::Accepted(text) => format!("accepted: {text}"),
            Answer::Unsealed(text) => format!("unsealed: {text}"),
            Answer::Sealed(text) => format!("sealed: {text}"),
            Answer::Refused(text) => format!("refused: {text}"),
            Answer::Rotated { said, shares } => {
                let mut line = format!("rotated: {said}");
                for share in shares {
                    line.push_str(" share ");
                    line.push_str(share);
                }
                line
            }
        }
    }

    /// The line for the log and the audit trail: never a share.
    pub fn public_line(&self) -> String {
        match self {
            Answer::Rotated { said, .. } => format!("rotated: {said}"),
            other => other.line(),
        }
    }
}

impl Unsealing {
    pub fn new(
        custodian: Arc<Custodian>,
        below: Arc<dyn Store>,
        (threshold, shares): (u8, u8),
        before_serving: Option<BeforeServing>,
    ) -> Unsealing {
        Unsealing {
            custodian,
            below,
            threshold,
            shares,
            before_serving,
            state: tokio::sync::Mutex::new(State::Gathering(Vec::new())),
        }
    }

    /// One operator's share, as typed.
    pub async fn give(&self, text: &str) -> Answer {
        let mut state = self.state.lock().await;
        let State::Gathering(given) = &mut *state else {
            return Answer::Unsealed("already unsealed; nothing to do".into());
        };
        let threshold = self.threshold;
        let so_far = |count: usize| format!("{count} of {threshold} shares given so far");
        let unchanged = |problem: String, count: usize| {
            Answer::Refused(format!("{problem}; nothing changed: {}", so_far(count)))
        };
        let share: Share = match shamir::parse_share(text) {
            Ok(share) => share,
            Err(problem) => return unchanged(format!("this share {problem}"), given.len()),
        };
        if share.threshold != threshold {
            return unchanged(
                format!(
                    "this share was made for a threshold of {}, but the config says \
                     {threshold}: it belongs to another set of shares (or the config changed)",
                    share.threshold
                ),
                given.len(),
            );
        }
        if let Some(first) = given.first()
            && first.set != share.set
        {
            return unchanged(
                format!(
                    "this share comes from another set (another `key-source init`) than the {} \
                     given before it; if those are the wrong ones, discard them with \
                     `unseal-server --start-over`",
                    given.len()
                ),
                given.len(),
            );
        }
        if given.iter().any(|earlier| earlier.index == share.index) {
            return unchanged(
                format!(
                    "share number {} was given already; each operator gives a different share",
                    share.index
                ),
                given.len(),
            );
        }
        given.push(Given {
            index: share.index,
            set: share.set,
            text: Zeroizing::new(text.trim().to_string()),
        });
        if given.len() < usize::from(threshold) {
            return Answer::Accepted(format!(
                "share number {}; {}, {} more needed",
                share.index,
                so_far(given.len()),
                usize::from(threshold) - given.len()
            ));
        }
        // Whatever happens now, these shares are spent: a retry starts afresh.
        let shares = std::mem::take(given);
        match self.unseal(&shares).await {
            Ok(()) => {
                *state = State::Unsealed;
                Answer::Unsealed(format!(
                    "the server serves now (data keys {:?})",
                    self.custodian.versions()
                ))
            }
            Err(problem) => Answer::Refused(format!(
                "{problem}. The server stays sealed; the {threshold} shares were discarded: \
                 give {threshold} shares again"
            )),
        }
    }

    async fn unseal(&self, shares: &[Given]) -> Result<(), String> {
        let texts: Vec<&str> = shares.iter().map(|share| share.text.as_str()).collect();
        let key = shamir::combine(self.threshold, &texts).map_err(|e| e.to_string())?;
        let wrong_set = |error: CustodyError| match error {
            CustodyError::WrongRoot { .. } => format!(
                "these {} shares rebuild a key, but not the one this database's data keys are \
                 wrapped under: they come from another `key-source init` (another set of \
                 shares) than the one made for this database",
                self.threshold
            ),
            other => format!("the shares rebuild a key, but unsealing failed: {other}"),
        };
        if let Some(before_serving) = &self.before_serving {
            let copy = SecretKey::from_slice(key.expose()).expect("a key is 32 bytes");
            let staging = Custodian::open(
                Arc::clone(&self.below),
                Root::Key(copy),
                Arc::new(Metrics::new()),
            )
            .await
            .map_err(wrong_set)?;
            before_serving(staging).await?;
        }
        self.custodian
            .unseal(Root::Key(key))
            .await
            .map_err(wrong_set)
    }

    /// Discards the shares given so far (one of them was from another set).
    pub async fn start_over(&self) -> Answer {
        match &mut *self.state.lock().await {
            State::Unsealed => Answer::Unsealed("already unsealed; nothing to do".into()),
            State::Gathering(given) => {
                let discarded = match given.len() {
                    1 => "the share".to_string(),
                    count => format!("the {count} shares"),
                };
                given.clear();
                Answer::Sealed(format!(
                    "discarded {discarded} given so far; {} are needed",
                    self.threshold
                ))
            }
        }
    }

    /// `keys rotate-data-key`: only this server holds the root of a shamir source.
    pub async fn rotate_data_key(&self) -> Answer {
        if let Some(refused) = self.refused_while_sealed().await {
            return refused;
        }
        match self.custodian.rotate_data_key().await {
            Ok(version) => Answer::Rotated {
                said: format!(
                    "made data key v{version}: new seals use it, and older records are \
                     re-wrapped in the background"
                ),
                shares: Vec::new(),
            },
            Err(error) => Answer::Refused(format!("the data key was not rotated: {error}")),
        }
    }

    /// `keys rotate-root`: a new root key, split into new shares that the caller shows
    /// once; the data keys are re-wrapped under it, the old shares open nothing after.
    pub async fn rotate_root(&self) -> Answer {
        if let Some(refused) = self.refused_while_sealed().await {
            return refused;
        }
        let (key, shares) = shamir::new_root(self.threshold, self.shares);
        match self.custodian.rotate_root(Root::Key(key)).await {
            Ok(versions) => Answer::Rotated {
                said: format!(
                    "re-wrapped data keys {versions:?} under a new root key in {} shares, any \
                     {} of which rebuild it; the old shares open nothing from now on",
                    self.shares, self.threshold
                ),
                shares: shares.into_iter().map(Zeroizing::new).collect(),
            },
            Err(error) => Answer::Refused(format!("the root was not rotated: {error}")),
        }
    }

    /// `keys destroy-data-key`, as [`Unsealing::rotate_data_key`].
    pub async fn destroy_data_key(&self, version: u32, shred: bool) -> Answer {
        if let Some(refused) = self.refused_while_sealed().await {
            return refused;
        }
        match self.custodian.destroy_data_key(version, shred).await {
            Ok(destroyed) => Answer::Rotated {
                said: format!(
                    "destroyed data key v{version}; {} records wrapped under it are unreadable \
                     for good",
                    destroyed.records
                ),
                shares: Vec::new(),
            },
            Err(error) => Answer::Refused(format!("nothing was destroyed: {error}")),
        }
    }

    async fn refused_while_sealed(&self) -> Option<Answer> {
        matches!(&*self.state.lock().await, State::Gathering(_))
            .then(|| Answer::Refused("the server is sealed: give the key shares first".into()))
    }

    pub async fn status(&self) -> Answer {
        match &*self.state.lock().await {
            State::Unsealed => Answer::Unsealed("the server serves".into()),
            State::Gathering(given) => Answer::Sealed(format!(
                "waiting for key shares: {} of {} given so far",
                given.len(),
                self.threshold
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    struct Fixture {
        _dir: tempfile::TempDir,
        database: std::path::PathBuf,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let database = dir.path().join("kms.db");
            Fixture {
                _dir: dir,
                database,
            }
        }

        fn unsealing(&self, threshold: u8) -> (Arc<Custodian>, Unsealing) {
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&self.database).unwrap());
            let custodian = Custodian::sealed(Arc::clone(&store), Arc::new(Metrics::new()));
            let unsealing = Unsealing::new(Arc::clone(&custodian), store, (threshold, 5), None);
            (custodian, unsealing)
        }
    }

    fn shares(threshold: u8, count: u8) -> Vec<String> {
        shamir::init(threshold, count).unwrap().shares
    }

    fn refused(answer: Answer) -> String {
        match answer {
            Answer::Refused(text) => text,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_threshold_of_good_shares_unseals_and_each_bad_one_is_named() {
        let fixture = Fixture::new();
        let (custodian, unsealing) = fixture.unsealing(3);
        let good = shares(3, 5);
        let other = shares(3, 5);

        let accepted = unsealing.give(&good[1]).await;
        assert_eq!(
            accepted,
            Answer::Accepted("share number 2; 1 of 3 shares given so far, 2 more needed".into())
        );
        let repeated = refused(unsealing.give(&format!("  {}\n", good[1])).await);
        assert!(
            repeated.contains("share number 2 was given already")
                && repeated.ends_with("nothing changed: 1 of 3 shares given so far"),
            "{repeated}"
        );
        let foreign = refused(unsealing.give(&other[0]).await);
        assert!(foreign.contains("another set"), "{foreign}");
        let mistyped = good[3].replacen("tkms1-3-4-", "tkms1-3-5-", 1);
        assert!(refused(unsealing.give(&mistyped).await).contains("this share is mistyped"));
        assert!(refused(unsealing.give("hello").await).contains("this share is not a share"));
        let two_of = shares(2, 3);
        assert!(refused(unsealing.give(&two_of[0]).await).contains("threshold of 2"));
        assert_eq!(
            unsealing.status().await,
            Answer::Sealed("waiting for key shares: 1 of 3 given so far".into())
        );
        assert!(custodian.is_sealed());

        assert!(matches!(
            unsealing.give(&good[4]).await,
            Answer::Accepted(_)
        ));
        assert!(matches!(
            unsealing.give(&good[0]).await,
            Answer::Unsealed(_)
        ));
        assert!(!custodian.is_sealed());
        assert_eq!(custodian.versions(), vec![1]);
        assert_eq!(
            unsealing.give(&good[2]).await,
            Answer::Unsealed("already unsealed; nothing to do".into())
        );
    }

    #[tokio::test]
    async fn shares_of_another_set_than_the_databases_are_refused_and_discarded() {
        let fixture = Fixture::new();
        let good = shares(2, 3);
        {
            let (_, unsealing) = fixture.unsealing(2);
            unsealing.give(&good[0]).await;
            assert!(matches!(
                unsealing.give(&good[2]).await,
                Answer::Unsealed(_)
            ));
        }
        let (custodian, unsealing) = fixture.unsealing(2);
        let other = shares(2, 3);
        unsealing.give(&other[0]).await;
        let wrong = refused(unsealing.give(&other[1]).await);
        assert!(
            wrong.contains("not the one this database's data keys are wrapped under")
                && wrong.contains("give 2 shares again"),
            "{wrong}"
        );
        assert!(custodian.is_sealed());
        assert_eq!(
            unsealing.status().await,
            Answer::Sealed("waiting for key shares: 0 of 2 given so far".into())
        );
        unsealing.give(&good[1]).await;
        assert!(matches!(
            unsealing.give(&good[0]).await,
            Answer::Unsealed(_)
        ));
        assert!(!custodian.is_sealed());
    }

    #[tokio::test]
    async fn start_over_discards_the_shares_given() {
        let fixture = Fixture::new();
        let (_, unsealing) = fixture.unsealing(2);
        let old = shares(2, 2);
        let new = shares(2, 2);
        unsealing.give(&old[0]).await;
        assert!(refused(unsealing.give(&new[1]).await).contains("--start-over"));
        assert_eq!(
            unsealing.start_over().await,
            Answer::Sealed("discarded the share given so far; 2 are needed".into())
        );
        unsealing.give(&new[1]).await;
        assert!(matches!(unsealing.give(&new[0]).await, Answer::Unsealed(_)));
    }
}
