//! Who holds the connection slots, and which of them the server may take back.
//!
//! A slot is *busy* while the server owes its connection work: a ClientHello or request it
//! has not read yet, a handshake queued for or inside its computation, a call in flight. It
//! is *waiting* otherwise: on its client's next bytes (the ClientHello, the handshake's
//! Finished, a request). Only waiting connections are closed to make room, those whose
//! close throws least away first (an answered call's, then one whose handshake the server
//! has not computed yet), the longest-waiting of them, so that connections that hold a
//! slot without using it (silent sockets, slowloris, idle TLS connections) cannot lock
//! nodes out; and a connection that has waited for
//! [`ListenerLimits::idle_timeout`](super::ListenerLimits) is closed anyway.
//!
//! The request path only touches one connection's atomics ([`Busy`]); the registry's lock
//! is taken when a connection opens or closes, and for eviction, which scans it.

use crate::locking::lock;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Set in [`Slot::state`] once the server decided to close the connection.
const CLOSING: u64 = 1 << 63;

/// What closing a waiting connection would throw away, in the order they are closed: an
/// answered call's connection nothing, one before its handshake's costly step nothing
/// either, one whose handshake the server has paid for (a node about to call) that work.
const ANSWERED: u8 = 0;
const UNPAID: u8 = 1;
const PAID: u8 = 2;

/// A waiting connection is evictable only after waiting this long (or the idle timeout, if
/// shorter): a node waits on nothing but its own round trip, and a new node's connection
/// must not close another node's half-done handshake during a reboot storm.
const EVICTABLE_AFTER: Duration = Duration::from_millis(250);

pub struct Slots {
    epoch: Instant,
    max_per_address: usize,
    evictable_after: Duration,
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    /// Each open connection, with the address it is counted by: its TCP peer's, or the
    /// client's that a trusted proxy's PROXY header carried ([`SlotHandle::move_to`]).
    open: HashMap<u64, (IpAddr, Arc<Slot>)>,
    per_address: HashMap<IpAddr, usize>,
}

impl Registry {
    fn count(&mut self, ip: IpAddr) {
        *self.per_address.entry(ip).or_default() += 1;
    }

    fn uncount(&mut self, ip: IpAddr) {
        if let Some(held) = self.per_address.get_mut(&ip) {
            *held -= 1;
            if *held == 0 {
                self.per_address.remove(&ip);
            }
        }
    }
}

/// One open connection's state, shared by its handler and the requests it serves.
pub struct Slot {
    id: u64,
    epoch: Instant,
    /// Busy count (calls in flight, handshake work), plus [`CLOSING`].
    state: AtomicU64,
    /// When it last began waiting on its client, in µs since `epoch`.
    since: AtomicU64,
    /// [`ANSWERED`], [`UNPAID`] or [`PAID`]: which waiting connections are closed first.
    stage: AtomicU8,
    evicted: Notify,
}

/// What the per-address cap left for a new connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Room {
    /// Under the cap.
    Free,
    /// At the cap: the address's own longest-waiting connection is being closed.
    EvictedOwn,
    /// At the cap with nothing of the address's to close: refuse the new connection.
    None,
}

/// What [`Slots::evict_oldest`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Eviction {
    /// Closing the connection from this address that waited longest.
    Evicted(IpAddr),
    /// A connection is already closing and its slot about to be free: nothing more is closed.
    Pending,
    /// Every connection is busy (or waited too briefly): the new one waits for a slot.
    Nothing,
}

/// Why a handler must close its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// Waited on its client for the idle timeout.
    Idle,
    /// Closed to make room for another connection.
    Evicted,
}

impl Slots {
    pub fn new(max_per_address: usize, idle_timeout: Duration) -> Slots {
        Slots {
            epoch: Instant::now(),
            max_per_address: max_per_address.max(1),
            evictable_after: EVICTABLE_AFTER.min(idle_timeout),
            registry: Mutex::default(),
        }
    }

    /// Makes room under the per-address cap for a new connection from `ip` (canonical).
    ///
    /// At the cap, the address's own connection that waited longest is closed rather than
    /// the new one refused: nodes behind one NAT share an address, and a fresh connection
    /// carries a call at once (Talos calls right after its handshake) while a waiting one is
    /// holding a slot. Connections still closing count too, and past twice the cap new ones
    /// are refused, so that an address opening connections faster than they close cannot
    /// take more than its share.
    pub fn make_room_for(&self, ip: IpAddr) -> Room {
        let registry = lock(&self.registry);
        let held = registry.per_address.get(&ip).copied().unwrap_or(0);
        if held < self.max_per_address {
            return Room::Free;
        }
        if held < 2 * self.max_per_address && self.evict(&registry, Some(ip)).is_some() {
            return Room::EvictedOwn;
        }
        Room::None
    }

    /// When every slot is taken: closes a connection waiting on its client, the one whose
    /// close throws least away (an answered one, then one whose handshake is not paid
    /// for yet), the longest-waiting of them.
    pub fn evict_oldest(&self) -> Eviction {
        let registry = lock(&self.registry);
        let about_to_close = registry
            .open
            .values()
            .any(|(_, slot)| slot.state.load(Ordering::Acquire) == CLOSING);
        if about_to_close {
            return Eviction::Pending;
        }
        match self.evict(&registry, None) {
            Some(ip) => Eviction::Evicted(ip),
            None => Eviction::Nothing,
        }
    }

    /// Closes the waiting connection (of `only` if given) whose close throws least away,
    /// the longest-waiting of those; its address.
    fn evict(&self, registry: &Registry, only: Option<IpAddr>) -> Option<IpAddr> {
        let now = self.now_us();
        let waited_enough = self.evictable_after.as_micros() as u64;
        // A connection becomes busy between the scan and the claim: look again, a few times.
        for _ in 0..4 {
            let oldest = registry
                .open
                .values()
                .filter(|(ip, _)| only.is_none_or(|only| *ip == only))
                .filter(|(_, slot)| slot.state.load(Ordering::Acquire) == 0)
                .map(|(ip, slot)| (slot.since.load(Ordering::Relaxed), *ip, slot))
                .filter(|(since, _, _)| now.saturating_sub(*since) >= waited_enough)
                .min_by_key(|(since, _, slot)| {
                    (slot.stage.load(Ordering::Relaxed), *since, slot.id)
                })?;
            let (_, ip, slot) = oldest;
            if slot.claim() {
                slot.evicted.notify_one();
                return Some(ip);
            }
        }
        None
    }

    /// Registers a new connection from `ip` (canonical); it starts busy, with `first_look`,
    /// until its handler has read what the client sent with it.
    pub fn register(self: &Arc<Self>, ip: IpAddr) -> Registered {
        let mut registry = lock(&self.registry);
        let id = registry.next_id;
        registry.next_id += 1;
        let slot = Arc::new(Slot {
            id,
            epoch: self.epoch,
            state: AtomicU64::new(1),
            since: AtomicU64::new(self.now_us()),
            stage: AtomicU8::new(UNPAID),
            evicted: Notify::new(),
        });
        registry.open.insert(id, (ip, Arc::clone(&slot)));
        registry.count(ip);
        drop(registry);
        Registered {
            first_look: Busy(Arc::clone(&slot)),
            slot: SlotHandle {
                slot,
                slots: Arc::clone(self),
            },
        }
    }

    fn now_us(&self) -> u64 {
        micros_since(self.epoch)
    }

    #[cfg(test)]
    fn held_by(&self, ip: IpAddr) -> usize {
        lock(&self.registry)
            .per_address
            .get(&ip)
            .copied()
            .unwrap_or(0)
    }
}

fn micros_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// A new connection's slot, and its first busy period.
pub struct Registered {
    pub slot: SlotHandle,
    pub first_look: Busy,
}

/// The handler's hold on its slot: the slot is free again when it is dropped.
pub struct SlotHandle {
    slot: Arc<Slot>,
    slots: Arc<Slots>,
}

impl std::ops::Deref for SlotHandle {
    type Target = Arc<Slot>;

    fn deref(&self) -> &Arc<Slot> {
        &self.slot
    }
}

impl Drop for SlotHandle {
    fn drop(&mut self) {
        let mut registry = lock(&self.slots.registry);
        if let Some((ip, _)) = registry.open.remove(&self.slot.id) {
            registry.uncount(ip);
        }
    }
}

impl SlotHandle {
    /// Counts the connection by `ip` (canonical) from now on, under the per-address cap:
    /// the client address a trusted proxy's PROXY header carried. The proxy's own address,
    /// which many nodes share, then holds nothing for it. Room is made as for a new
    /// connection from `ip` ([`Slots::make_room_for`]); on [`Room::None`] nothing moves and
    /// the caller closes the connection.
    pub fn move_to(&self, ip: IpAddr) -> Room {
        let room = self.slots.make_room_for(ip);
        if room == Room::None {
            return room;
        }
        let mut registry = lock(&self.slots.registry);
        let Some((held, _)) = registry.open.get_mut(&self.slot.id) else {
            return room;
        };
        let old = std::mem::replace(held, ip);
        registry.uncount(old);
        registry.count(ip);
        room
    }
}

/// Marks a slot busy until dropped; dropping the last one starts a wait on the client.
pub struct Busy(Arc<Slot>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0
            .since
            .store(micros_since(self.0.epoch), Ordering::Relaxed);
        self.0.state.fetch_sub(1, Ordering::Release);
    }
}

impl Slot {
    /// Marks the connection busy (a call arrived, a handshake step began) until the guard
    /// is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.state.fetch_add(1, Ordering::Acquire);
        Busy(Arc::clone(self))
    }

    /// The server has computed the connection's handshake flight: closing it now would
    /// throw that work away.
    pub fn paid(&self) {
        let _ = self
            .stage
            .compare_exchange(UNPAID, PAID, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// A call on the connection has been answered: closing it throws nothing away.
    pub fn answered(&self) {
        self.stage.store(ANSWERED, Ordering::Relaxed);
    }

    /// Whether the connection has work in flight.
    pub fn is_busy(&self) -> bool {
        self.busy_count() > 0
    }

    fn busy_count(&self) -> u64 {
        self.state.load(Ordering::Acquire) & !CLOSING
    }

    /// Marks a waiting connection closing; false if it is busy or closing already.
    fn claim(&self) -> bool {
        self.state
            .compare_exchange(0, CLOSING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// When the current wait on the client began (meaningful only when not busy).
    fn waiting_since(&self) -> Instant {
        self.epoch + Duration::from_micros(self.since.load(Ordering::Relaxed))
    }

    /// Resolves when the connection must close: evicted, or waiting on its client for
    /// `idle` with nothing in flight. A busy connection is looked at again after `idle`.
    pub async fn until_closed(&self, idle: Duration) -> Closed {
        loop {
            let state = self.state.load(Ordering::Acquire);
            if state & CLOSING != 0 {
                return Closed::Evicted;
            }
            let now = Instant::now();
            let deadline = if state == 0 {
                self.waiting_since() + idle
            } else {
                now + idle
            };
            if state == 0 && deadline <= now {
                if self.claim() {
                    return Closed::Idle;
                }
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.evicted.notified() => return Closed::Evicted,
            }
        }
    }

    /// Resolves once nothing has been in flight for `grace`, counted from `from` at the
    /// earliest: bounds how long a closing connection waits for a client that does not
    /// answer its GOAWAY.
    pub async fn idle_for(&self, grace: Duration, from: Instant) {
        loop {
            let now = Instant::now();
            let deadline = if self.busy_count() == 0 {
                self.waiting_since().max(from) + grace
            } else {
                now + grace
            };
            if self.busy_count() == 0 && deadline <= now {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(5);

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// A registered connection that has read its first bytes and now waits on its client.
    fn waiting(slots: &Arc<Slots>, from: &str) -> SlotHandle {
        let Registered { slot, first_look } = slots.register(ip(from));
        drop(first_look);
        slot
    }

    /// Lets every waiting connection wait long enough to be evictable.
    async fn age() {
        tokio::time::advance(Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_longest_waiting_connection_is_evicted_never_a_busy_one() {
        let slots = Arc::new(Slots::new(100, IDLE));
        let first = waiting(&slots, "10.0.0.1");
        tokio::time::advance(Duration::from_secs(1)).await;
        let second = waiting(&slots, "10.0.0.2");
        tokio::time::advance(Duration::from_secs(1)).await;
        let third = waiting(&slots, "10.0.0.3");
        let call = first.busy();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(slots.evict_oldest(), Eviction::Evicted(ip("10.0.0.2")));
        assert_eq!(second.until_closed(IDLE).await, Closed::Evicted);
        assert_eq!(
            slots.evict_oldest(),
            Eviction::Pending,
            "one closing at a time: its slot is about to be free"
        );
        drop(second);
        drop(call);
        // The first connection's wait began when its call ended: it is now the newest.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(slots.evict_oldest(), Eviction::Evicted(ip("10.0.0.3")));
        drop(third);
        let _call = first.busy();
        assert_eq!(slots.evict_oldest(), Eviction::Nothing);
    }

    #[tokio::test(start_paused = true)]
    async fn a_paid_for_handshake_is_closed_last_an_answered_connection_first() {
        let slots = Arc::new(Slots::new(100, IDLE));
        let paid = waiting(&slots, "10.0.0.1");
        paid.paid();
        let unpaid = waiting(&slots, "10.0.0.2");
        let answered = waiting(&slots, "10.0.0.3");
        answered.paid();
        answered.answered();
        age().await;
        assert_eq!(slots.evict_oldest(), Eviction::Evicted(ip("10.0.0.3")));
        drop(answered);
        assert_eq!(slots.evict_oldest(), Eviction::Evicted(ip("10.0.0.2")));
        drop(unpaid);
        assert_eq!(slots.evict_oldest(), Eviction::Evicted(ip("10.0.0.1")));
        drop(paid);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_not_yet_read_or_that_waited_briefly_is_not_evicted() {
        let slots = Arc::new(Slots::new(100, IDLE));
        let Registered { slot, first_look } = slots.register(ip("10.0.0.1"));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(slots.evict_oldest(), Eviction::Nothing, "not read yet");
        drop(first_look);
        tokio::time::advance(EVICTABLE_AFTER / 2).await;
        assert_eq!(slots.evict_oldest(), Eviction::Nothing, "a round trip");
        tokio::time::advance(EVICTABLE_AFTER).await;
        assert_eq!(slots.evict_oldest(), Eviction::Evicted(ip("10.0.0.1")));
        drop(slot);
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_at_its_cap_makes_room_by_closing_its_own_waiting_connection() {
        let slots = Arc::new(Slots::new(2, IDLE));
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let held: Vec<SlotHandle> = (0..2).map(|_| waiting(&slots, "10.0.0.1")).collect();
        let other = waiting(&slots, "10.0.0.2");
        age().await;
        assert_eq!(slots.make_room_for(b), Room::Free);
        let _calls: Vec<Busy> = held.iter().map(|slot| slot.busy()).collect();
        assert_eq!(
            slots.make_room_for(a),
            Room::None,
            "every connection of the address has a call in flight"
        );
        drop(_calls);
        age().await;
        assert_eq!(slots.make_room_for(a), Room::EvictedOwn);
        assert_eq!(
            other.state.load(Ordering::Acquire),
            0,
            "another address's connection is never taken"
        );
        let more: Vec<SlotHandle> = (0..2).map(|_| waiting(&slots, "10.0.0.1")).collect();
        age().await;
        assert_eq!(slots.held_by(a), 4);
        assert_eq!(
            slots.make_room_for(a),
            Room::None,
            "past twice the cap, closing ones count: refused"
        );
        drop((held, more));
        assert_eq!(slots.held_by(a), 0);
        assert_eq!(slots.held_by(b), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_proxied_connection_moves_to_the_share_of_the_address_its_header_carried() {
        let slots = Arc::new(Slots::new(2, IDLE));
        let (proxy, node) = (ip("10.0.0.5"), ip("10.0.0.1"));
        // Many nodes behind one proxy: its address is never capped, only theirs.
        let through: Vec<SlotHandle> = (0..4).map(|_| waiting(&slots, "10.0.0.5")).collect();
        assert_eq!(slots.held_by(proxy), 4);
        assert_eq!(through[0].move_to(node), Room::Free);
        assert_eq!(through[1].move_to(node), Room::Free);
        assert_eq!((slots.held_by(proxy), slots.held_by(node)), (2, 2));
        let _calls: Vec<Busy> = through[..2].iter().map(|slot| slot.busy()).collect();
        assert_eq!(through[2].move_to(node), Room::None, "the node's cap holds");
        assert_eq!((slots.held_by(proxy), slots.held_by(node)), (2, 2));
        drop(_calls);
        age().await;
        assert_eq!(through[2].move_to(node), Room::EvictedOwn);
        assert_eq!(slots.held_by(node), 3, "the evicted one is still closing");
        drop(through);
        assert_eq!((slots.held_by(proxy), slots.held_by(node)), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_after_the_idle_timeout_a_busy_one_does_not() {
        let slots = Arc::new(Slots::new(100, IDLE));
        let slot = waiting(&slots, "10.0.0.1");
        let call = slot.busy();
        let closed = tokio::spawn({
            let slot = Arc::clone(&slot);
            async move {
                let closed = slot.until_closed(IDLE).await;
                (closed, Instant::now())
            }
        });
        tokio::time::advance(3 * IDLE).await;
        assert!(!closed.is_finished(), "a call in flight is never idle");
        drop(call);
        let ended = Instant::now();
        let (why, when) = closed.await.unwrap();
        assert_eq!(why, Closed::Idle);
        assert!(when >= ended + IDLE, "idle counts from the call's end");
        assert_eq!(
            slots.evict_oldest(),
            Eviction::Pending,
            "an idle-closed slot is about to be free"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_closing_connection_waits_for_its_calls_then_at_most_the_grace() {
        let slots = Arc::new(Slots::new(100, IDLE));
        let slot = waiting(&slots, "10.0.0.1");
        let grace = Duration::from_secs(1);
        let from = Instant::now();
        let call = slot.busy();
        let drained = tokio::spawn({
            let slot = Arc::clone(&slot);
            async move {
                slot.idle_for(grace, from).await;
                Instant::now()
            }
        });
        tokio::time::advance(3 * grace).await;
        assert!(!drained.is_finished());
        drop(call);
        let ended = Instant::now();
        assert!(drained.await.unwrap() >= ended + grace);
    }
}
