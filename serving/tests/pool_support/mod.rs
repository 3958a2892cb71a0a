//! A scriptable test double for `Replica`, shared by the pool tests.
#![allow(dead_code)] // Each test file uses a different part of the double.
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_serving::{
    BoxFuture, Load, LoadTracker, Pool, PoolBuilder, PoolRequest, Replica, ReplicaError,
    ReplicaErrorKind, ReplicaEvent, ReplicaId, TokenStream,
};

/// What the double does with the next request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Behaviour {
    /// Streams `tokens` tokens, one every `per_token`, then finishes.
    Ok { tokens: u32, per_token: Duration },
    /// Fails before the first token.
    Unavailable,
    /// Streams `n` tokens, then fails.
    FailAfter(u32),
    /// Streams `n` tokens, then closes the stream without finishing.
    EndEarly(u32),
    /// Panics inside `generate` itself.
    PanicSync,
    /// Returns a future that panics when polled.
    PanicAsync,
    /// Never answers.
    Hang,
    /// Streams `n` tokens, then never sends anything again.
    HangAfter(u32),
    /// Rejects the request as invalid.
    Reject,
    /// Says its own queue is full.
    Overloaded,
}

pub(crate) const FAST: Behaviour = Behaviour::Ok {
    tokens: 3,
    per_token: Duration::from_millis(10),
};

pub(crate) struct Fake {
    tracker: Arc<LoadTracker>,
    behaviour: Mutex<Behaviour>,
    calls: AtomicU64,
}

impl Fake {
    pub(crate) fn new(behaviour: Behaviour) -> Arc<Self> {
        Arc::new(Self {
            tracker: LoadTracker::new(Duration::from_secs(10)),
            behaviour: Mutex::new(behaviour),
            calls: AtomicU64::new(0),
        })
    }

    pub(crate) fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }

    pub(crate) fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    pub(crate) fn tracker(&self) -> &Arc<LoadTracker> {
        &self.tracker
    }
}

fn tokens(n: u32, per_token: Duration) -> Behaviour {
    Behaviour::Ok {
        tokens: n,
        per_token,
    }
}

impl Replica for Fake {
    fn generate(
        &self,
        request: PoolRequest,
    ) -> BoxFuture<'static, Result<TokenStream, ReplicaError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let b = *self.behaviour.lock().unwrap();
        let err = |kind, msg: &str| -> BoxFuture<'static, _> {
            let e = ReplicaError::new(kind, msg);
            Box::pin(async move { Err(e) })
        };
        let (n, per_token, end) = match b {
            Behaviour::Unavailable => return err(ReplicaErrorKind::Unavailable, "down"),
            Behaviour::Reject => return err(ReplicaErrorKind::Rejected, "bad request"),
            Behaviour::Overloaded => return err(ReplicaErrorKind::Overloaded, "queue full"),
            Behaviour::PanicSync => panic!("test double panics in generate"),
            Behaviour::PanicAsync => {
                return Box::pin(async { panic!("test double panics when polled") });
            }
            Behaviour::Hang => return Box::pin(std::future::pending()),
            Behaviour::Ok { tokens, per_token } => (tokens, per_token, End::Finish),
            Behaviour::FailAfter(k) => (k, Duration::from_millis(10), End::Fail),
            Behaviour::EndEarly(k) => (k, Duration::from_millis(10), End::Close),
            Behaviour::HangAfter(k) => (k, Duration::from_millis(10), End::Hang),
        };
        let mut ticket = self.tracker.begin(request.prompt_tokens(), n);
        let (tx, stream) = TokenStream::channel(4);
        tokio::spawn(async move {
            ticket.prefilled();
            for i in 0..n {
                tokio::time::sleep(per_token).await;
                let text = format!("t{i} ");
                if !tx.send(Ok(ReplicaEvent::Token { text })).await {
                    return; // cancelled
                }
                ticket.decoded();
            }
            match end {
                End::Finish => {
                    ticket.finish();
                    tx.send(Ok(ReplicaEvent::Finished { output_tokens: n }))
                        .await;
                }
                End::Fail => {
                    tx.send(Err(ReplicaError::new(ReplicaErrorKind::Failed, "crashed")))
                        .await;
                }
                End::Close => {}
                End::Hang => std::future::pending::<()>().await,
            }
        });
        Box::pin(async move { Ok(stream) })
    }

    fn load(&self) -> Load {
        self.tracker.load()
    }
}

#[derive(Clone, Copy)]
enum End {
    Finish,
    Fail,
    Close,
    Hang,
}

pub(crate) fn id(n: u64) -> ReplicaId {
    ReplicaId::new(n)
}

/// A seeded builder with `fakes` as replicas 0, 1, ...
pub(crate) fn builder(fakes: &[Arc<Fake>]) -> PoolBuilder {
    let mut b = Pool::builder().seed(42);
    for (i, f) in fakes.iter().enumerate() {
        b = b.replica(id(i as u64), f.clone() as Arc<dyn Replica>);
    }
    b
}

pub(crate) fn fakes(n: usize, b: Behaviour) -> Vec<Arc<Fake>> {
    (0..n).map(|_| Fake::new(b)).collect()
}

pub(crate) fn req() -> PoolRequest {
    PoolRequest::new("hello there", 3)
}

pub(crate) fn slow(per_token_ms: u64) -> Behaviour {
    tokens(3, Duration::from_millis(per_token_ms))
}
