//! Endpoint discovery through the public API: a static list, the in-process registry with
//! heartbeats, and sources that error or flap, all while requests keep flowing.

mod pool_support;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use keel_serving::{
    BoxFuture, Discovery, DiscoveryError, DiscoveryEvent, EndpointStatus, Error, Pool, Registry,
    Replica, StaticDiscovery,
};
use pool_support::{FAST, Fake, fakes, id, req, slow};

/// Lets the pool's discovery task run (it is spawned on the same runtime).
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn dyn_replica(f: &Arc<Fake>) -> Arc<dyn Replica> {
    f.clone()
}

#[tokio::test(start_paused = true)]
async fn static_discovery_announces_its_list() {
    let f = fakes(3, FAST);
    let source = StaticDiscovery::new(
        f.iter()
            .enumerate()
            .map(|(i, r)| (id(i as u64), dyn_replica(r))),
    );
    let pool = Pool::builder().seed(1).discovery(source).build().unwrap();
    settle().await;
    assert_eq!(pool.replica_ids(), vec![id(0), id(1), id(2)]);
    pool.generate(req()).await.unwrap().collect().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn registry_join_leave_and_status() {
    let reg = Registry::new(Duration::from_secs(5));
    let f = fakes(3, FAST);
    reg.join(id(0), dyn_replica(&f[0]));
    let pool = Pool::builder()
        .seed(1)
        .discovery(reg.watch())
        .build()
        .unwrap();
    settle().await;
    assert_eq!(pool.replica_ids(), vec![id(0)]);

    reg.join(id(1), dyn_replica(&f[1]));
    reg.join(id(2), dyn_replica(&f[2]));
    settle().await;
    assert_eq!(pool.replica_ids(), vec![id(0), id(1), id(2)]);

    reg.set_status(id(0), EndpointStatus::Draining).unwrap();
    reg.leave(id(1)).unwrap();
    settle().await;
    assert_eq!(pool.replica_ids(), vec![id(0), id(2)]);
    for _ in 0..10 {
        assert_eq!(pool.reserve().unwrap().replica(), id(2));
    }
    assert!(matches!(
        reg.leave(id(1)),
        Err(Error::UnknownReplica { .. })
    ));
    assert!(matches!(
        reg.set_status(id(7), EndpointStatus::Serving),
        Err(Error::UnknownReplica { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_misses_heartbeats_is_removed() {
    let reg = Registry::new(Duration::from_secs(1));
    let f = fakes(2, FAST);
    reg.join(id(0), dyn_replica(&f[0]));
    reg.join(id(1), dyn_replica(&f[1]));
    let pool = Pool::builder()
        .seed(1)
        .discovery(reg.watch())
        .build()
        .unwrap();
    settle().await;
    // Replica 0 heartbeats every 400 ms; replica 1 falls silent.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        reg.heartbeat(id(0)).unwrap();
    }
    settle().await;
    assert_eq!(reg.members(), vec![id(0)]);
    assert_eq!(pool.replica_ids(), vec![id(0)]);
    assert!(matches!(
        reg.heartbeat(id(1)),
        Err(Error::UnknownReplica { .. })
    ));
    // It can come back by joining again.
    reg.join(id(1), dyn_replica(&f[1]));
    settle().await;
    assert_eq!(pool.replica_ids(), vec![id(0), id(1)]);
}

/// A scripted discovery source: each step is an event, an error, or a pause.
enum Step {
    Event(DiscoveryEvent),
    Fail,
    Wait(Duration),
}

struct Scripted(VecDeque<Step>);

impl Discovery for Scripted {
    fn next_event(&mut self) -> BoxFuture<'_, Option<Result<DiscoveryEvent, DiscoveryError>>> {
        Box::pin(async move {
            loop {
                match self.0.pop_front()? {
                    Step::Event(e) => return Some(Ok(e)),
                    Step::Fail => return Some(Err(DiscoveryError::new("registry unreachable"))),
                    Step::Wait(d) => tokio::time::sleep(d).await,
                }
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn discovery_errors_keep_the_last_known_set() {
    let f = fakes(2, FAST);
    let mut steps = VecDeque::new();
    steps.extend((0..5).map(|_| Step::Fail));
    steps.push_back(Step::Event(DiscoveryEvent::Add {
        id: id(1),
        replica: dyn_replica(&f[1]),
    }));
    let pool = Pool::builder()
        .seed(1)
        .replica(id(0), dyn_replica(&f[0]))
        .discovery(Scripted(steps))
        .build()
        .unwrap();
    // While discovery fails, traffic keeps flowing to what the pool already has.
    for _ in 0..3 {
        let out = pool.generate(req()).await.unwrap().collect().await.unwrap();
        assert_eq!(out.replica, id(0));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = pool.stats();
    assert_eq!(s.discovery_errors, 5);
    assert_eq!(pool.replica_ids(), vec![id(0), id(1)]);
}

#[tokio::test(start_paused = true)]
async fn a_finished_source_leaves_the_set_as_it_was() {
    let f = fakes(1, FAST);
    let steps = VecDeque::from([Step::Event(DiscoveryEvent::Add {
        id: id(4),
        replica: dyn_replica(&f[0]),
    })]);
    let pool = Pool::builder().discovery(Scripted(steps)).build().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(pool.replica_ids(), vec![id(4)]);
    assert!(pool.generate(req()).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn flapping_membership_never_loses_a_request() {
    // Replica 0 is stable; replica 1 is added and removed every 30 ms while requests that take
    // 300 ms each are in flight on both.
    let stable = Fake::new(slow(100));
    let flappy = Fake::new(slow(100));
    let mut steps = VecDeque::new();
    for _ in 0..40 {
        steps.push_back(Step::Event(DiscoveryEvent::Add {
            id: id(1),
            replica: dyn_replica(&flappy),
        }));
        steps.push_back(Step::Wait(Duration::from_millis(15)));
        steps.push_back(Step::Event(DiscoveryEvent::Remove { id: id(1) }));
        steps.push_back(Step::Event(DiscoveryEvent::Update {
            id: id(9),
            status: EndpointStatus::Unhealthy,
        }));
        steps.push_back(Step::Wait(Duration::from_millis(15)));
    }
    let pool = Pool::builder()
        .seed(3)
        .replica(id(0), dyn_replica(&stable))
        .discovery(Scripted(steps))
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10 * i)).await;
                pool.generate(req()).await?.collect().await
            })
        })
        .collect();
    let mut on_flappy = 0;
    for t in tasks {
        let out = t.await.unwrap().unwrap();
        if out.replica == id(1) {
            on_flappy += 1;
        }
    }
    assert!(on_flappy > 0, "the flapping replica never served");
    let s = pool.stats();
    assert_eq!(s.successes, 100);
    assert_eq!(s.in_flight, 0);
    assert_eq!(pool.replica_ids(), vec![id(0)]);
}

#[tokio::test(start_paused = true)]
async fn replacing_a_replica_lets_old_requests_finish() {
    let old = Fake::new(slow(100));
    let new = Fake::new(FAST);
    let pool = Pool::builder()
        .replica(id(0), dyn_replica(&old))
        .build()
        .unwrap();
    let s = pool.generate(req()).await.unwrap();
    pool.apply(DiscoveryEvent::Add {
        id: id(0),
        replica: dyn_replica(&new),
    });
    let out = pool.generate(req()).await.unwrap().collect().await.unwrap();
    assert_eq!(out.text, "t0 t1 t2 ");
    assert_eq!(new.calls(), 1);
    assert_eq!(s.collect().await.unwrap().output_tokens, 3);
    assert_eq!(old.calls(), 1);
    assert_eq!(pool.stats().successes, 2);
}

#[tokio::test(start_paused = true)]
async fn a_new_watcher_sees_current_members_and_their_status() {
    let reg = Registry::new(Duration::from_secs(5));
    let f = fakes(2, FAST);
    reg.join(id(0), dyn_replica(&f[0]));
    reg.join(id(1), dyn_replica(&f[1]));
    reg.set_status(id(1), EndpointStatus::Unhealthy).unwrap();
    let pool = Pool::builder()
        .seed(1)
        .discovery(reg.watch())
        .build()
        .unwrap();
    settle().await;
    assert_eq!(pool.replica_ids(), vec![id(0), id(1)]);
    for _ in 0..10 {
        assert_eq!(pool.reserve().unwrap().replica(), id(0));
    }
    // Nobody heartbeats: both expire, and the pool is left with nothing to pick.
    tokio::time::sleep(Duration::from_secs(6)).await;
    settle().await;
    assert!(reg.members().is_empty());
    assert!(reg.expire().is_empty());
    assert!(pool.replica_ids().is_empty());
    assert!(matches!(pool.reserve(), Err(Error::NoReplicas)));
}
