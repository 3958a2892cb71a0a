//! Endpoint discovery: a source of add / remove / update events, with a static list and an
//! in-process registry (join, heartbeat, leave; members that miss heartbeats are removed).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::replica::{BoxFuture, Replica, ReplicaId};
use crate::error::{Error, Result};

/// What a discovery source says about an endpoint's willingness to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum EndpointStatus {
    /// Takes new requests.
    #[default]
    Serving,
    /// Finishes what it has and takes nothing new (a rolling update is replacing it).
    Draining,
    /// Failing its own health checks; takes nothing new.
    Unhealthy,
}

/// One change to the set of endpoints.
#[non_exhaustive]
pub enum DiscoveryEvent {
    /// A new endpoint, or a new backend for an existing id (the old one finishes its in-flight
    /// requests and is then dropped).
    Add {
        /// The endpoint's id.
        id: ReplicaId,
        /// The backend to send requests to.
        replica: Arc<dyn Replica>,
    },
    /// The endpoint is gone; in-flight requests on it still finish or fail on their own.
    Remove {
        /// The endpoint's id.
        id: ReplicaId,
    },
    /// The endpoint's status changed.
    Update {
        /// The endpoint's id.
        id: ReplicaId,
        /// Its new status.
        status: EndpointStatus,
    },
}

impl fmt::Debug for DiscoveryEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Add { id, .. } => f.debug_struct("Add").field("id", id).finish(),
            Self::Remove { id } => f.debug_struct("Remove").field("id", id).finish(),
            Self::Update { id, status } => f
                .debug_struct("Update")
                .field("id", id)
                .field("status", status)
                .finish(),
        }
    }
}

/// A discovery source failed to produce its next event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("discovery failed: {message}")]
pub struct DiscoveryError {
    message: String,
}

impl DiscoveryError {
    /// An error with a human-readable explanation.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The explanation.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// A stream of endpoint changes that a [`Pool`](crate::Pool) follows.
///
/// The pool applies each event as it arrives, without pausing traffic.
/// When `next_event` returns an error, the pool keeps its current set of replicas, counts the
/// error in [`PoolStats::discovery_errors`](crate::PoolStats), and asks again after a backoff
/// (10 ms doubling to 5 s). When it returns `None`, the source is finished and the pool keeps
/// the last set it was given.
pub trait Discovery: Send + 'static {
    /// Waits for the next change.
    fn next_event(&mut self) -> BoxFuture<'_, Option<Result<DiscoveryEvent, DiscoveryError>>>;
}

/// A fixed list of endpoints: one `Add` each, then the source finishes.
#[derive(Debug, Default)]
pub struct StaticDiscovery {
    pending: std::collections::VecDeque<(ReplicaId, Arc<dyn Replica>)>,
}

impl StaticDiscovery {
    /// A source that announces `replicas` in order.
    pub fn new(replicas: impl IntoIterator<Item = (ReplicaId, Arc<dyn Replica>)>) -> Self {
        Self {
            pending: replicas.into_iter().collect(),
        }
    }
}

impl Discovery for StaticDiscovery {
    fn next_event(&mut self) -> BoxFuture<'_, Option<Result<DiscoveryEvent, DiscoveryError>>> {
        let next = self
            .pending
            .pop_front()
            .map(|(id, replica)| Ok(DiscoveryEvent::Add { id, replica }));
        Box::pin(std::future::ready(next))
    }
}

struct Member {
    replica: Arc<dyn Replica>,
    status: EndpointStatus,
    last_seen: Instant,
}

#[derive(Default)]
struct RegistryState {
    members: BTreeMap<ReplicaId, Member>,
    watchers: Vec<mpsc::UnboundedSender<DiscoveryEvent>>,
}

impl RegistryState {
    fn broadcast(&mut self, make: impl Fn() -> DiscoveryEvent) {
        self.watchers.retain(|w| w.send(make()).is_ok());
    }
}

struct RegistryInner {
    ttl: Duration,
    state: Mutex<RegistryState>,
}

/// An in-process endpoint discovery service: replicas [`join`](Self::join), send
/// [`heartbeat`](Self::heartbeat)s and [`leave`](Self::leave); pools [`watch`](Self::watch) it.
///
/// A member whose last heartbeat (or join) is older than the heartbeat TTL is removed and every
/// watcher gets a `Remove`. Expiry is checked by the watchers while they wait, and by
/// [`expire`](Self::expire), so the registry needs no task of its own.
/// The registry's lock is taken only on membership changes, never on a request's path.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<RegistryInner>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("ttl", &self.inner.ttl)
            .field("members", &self.members())
            .finish()
    }
}

impl Registry {
    /// An empty registry that removes members silent for longer than `heartbeat_ttl`.
    pub fn new(heartbeat_ttl: Duration) -> Self {
        Self {
            inner: Arc::new(RegistryInner {
                ttl: heartbeat_ttl,
                state: Mutex::new(RegistryState::default()),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RegistryState> {
        // A panic while holding the lock cannot leave the map half-updated (every update is a
        // single insert or remove), so a poisoned lock is still consistent.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds (or replaces) a member, serving; counts as its first heartbeat.
    pub fn join(&self, id: ReplicaId, replica: Arc<dyn Replica>) {
        let mut st = self.lock();
        st.members.insert(
            id,
            Member {
                replica: Arc::clone(&replica),
                status: EndpointStatus::Serving,
                last_seen: Instant::now(),
            },
        );
        st.broadcast(|| DiscoveryEvent::Add {
            id,
            replica: Arc::clone(&replica),
        });
    }

    /// Records that `id` is alive.
    ///
    /// # Errors
    /// [`Error::UnknownReplica`] if `id` is not a member (it never joined, left, or already
    /// expired; it must join again).
    pub fn heartbeat(&self, id: ReplicaId) -> Result<()> {
        let mut st = self.lock();
        let m = st
            .members
            .get_mut(&id)
            .ok_or(Error::UnknownReplica { replica: id })?;
        m.last_seen = Instant::now();
        Ok(())
    }

    /// Changes a member's status (also counts as a heartbeat).
    ///
    /// # Errors
    /// [`Error::UnknownReplica`] if `id` is not a member.
    pub fn set_status(&self, id: ReplicaId, status: EndpointStatus) -> Result<()> {
        let mut st = self.lock();
        let m = st
            .members
            .get_mut(&id)
            .ok_or(Error::UnknownReplica { replica: id })?;
        m.last_seen = Instant::now();
        if m.status != status {
            m.status = status;
            st.broadcast(|| DiscoveryEvent::Update { id, status });
        }
        Ok(())
    }

    /// Removes a member.
    ///
    /// # Errors
    /// [`Error::UnknownReplica`] if `id` is not a member.
    pub fn leave(&self, id: ReplicaId) -> Result<()> {
        let mut st = self.lock();
        st.members
            .remove(&id)
            .ok_or(Error::UnknownReplica { replica: id })?;
        st.broadcast(|| DiscoveryEvent::Remove { id });
        Ok(())
    }

    /// The current members, by id.
    pub fn members(&self) -> Vec<ReplicaId> {
        self.lock().members.keys().copied().collect()
    }

    /// Removes every member whose last heartbeat is older than the TTL and returns their ids.
    pub fn expire(&self) -> Vec<ReplicaId> {
        let mut st = self.lock();
        let now = Instant::now();
        let ttl = self.inner.ttl;
        let dead: Vec<ReplicaId> = st
            .members
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.last_seen) > ttl)
            .map(|(&id, _)| id)
            .collect();
        for &id in &dead {
            st.members.remove(&id);
            st.broadcast(|| DiscoveryEvent::Remove { id });
        }
        dead
    }

    fn next_expiry(&self) -> Option<Instant> {
        let st = self.lock();
        st.members
            .values()
            .map(|m| m.last_seen + self.inner.ttl)
            .min()
    }

    /// A discovery source for a pool: the current members first, then every change.
    pub fn watch(&self) -> RegistryWatch {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.lock();
        for (&id, m) in &st.members {
            let _ = tx.send(DiscoveryEvent::Add {
                id,
                replica: Arc::clone(&m.replica),
            });
            if m.status != EndpointStatus::Serving {
                let _ = tx.send(DiscoveryEvent::Update {
                    id,
                    status: m.status,
                });
            }
        }
        st.watchers.push(tx);
        drop(st);
        RegistryWatch {
            registry: self.clone(),
            rx,
        }
    }
}

/// A [`Registry`]'s event stream, as a [`Discovery`] source.
#[derive(Debug)]
pub struct RegistryWatch {
    registry: Registry,
    rx: mpsc::UnboundedReceiver<DiscoveryEvent>,
}

impl Discovery for RegistryWatch {
    fn next_event(&mut self) -> BoxFuture<'_, Option<Result<DiscoveryEvent, DiscoveryError>>> {
        Box::pin(async move {
            loop {
                if let Ok(ev) = self.rx.try_recv() {
                    return Some(Ok(ev));
                }
                match self.registry.next_expiry() {
                    // Wake when the oldest heartbeat runs out, unless an event comes first.
                    Some(at) => {
                        // `+ 1 ms` so the member is strictly past its TTL when we look.
                        let at = at + Duration::from_millis(1);
                        match tokio::time::timeout_at(at, self.rx.recv()).await {
                            Ok(Some(ev)) => return Some(Ok(ev)),
                            Ok(None) => return None,
                            Err(_) => {
                                self.registry.expire();
                            }
                        }
                    }
                    None => return self.rx.recv().await.map(Ok),
                }
            }
        })
    }
}
