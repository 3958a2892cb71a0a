//! The pool over real in-process engines (SmolLM2 from `scripts/fetch-model`): output through
//! the pool equals the engine's own, bad requests are rejected without retries, and a shut-down
//! engine's requests move to the other replica.

use std::sync::Arc;

use keel_serving::{
    ChatMessage, Engine, EngineReplica, Error, GenerateRequest, Pool, PoolRequest, Replica,
    ReplicaErrorKind, ReplicaId, SamplingParams, resolve_model_path,
};

fn engine() -> Arc<Engine> {
    let path = resolve_model_path(None).unwrap_or_else(|e| {
        panic!(
            "this test needs the real model: run `scripts/fetch-model` from the repository root \
             (or set KEEL_MODEL). {e}"
        )
    });
    Arc::new(
        Engine::builder()
            .model_path(path)
            .kv_blocks(64)
            .build()
            .expect("the real model loads"),
    )
}

const PROMPT: &str = "Name three primary colors.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_over_two_engines() {
    let engines = [engine(), engine()];
    let direct = engines[0]
        .generate(
            GenerateRequest::chat([ChatMessage::user(PROMPT)])
                .sampling(SamplingParams::greedy().max_tokens(4)),
        )
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert!(!direct.text.is_empty());

    // CPU inference in a debug build on a shared machine: allow a slow first token.
    let mut b = Pool::builder()
        .seed(5)
        .first_token_timeout(std::time::Duration::from_secs(600))
        .default_deadline(std::time::Duration::from_secs(600));
    for (i, e) in engines.iter().enumerate() {
        let r: Arc<dyn Replica> = Arc::new(EngineReplica::new(e.clone()));
        b = b.replica(ReplicaId::new(i as u64), r);
    }
    let pool = b.build().unwrap();

    // Greedy output through the pool is the engine's own, whichever replica serves it.
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.generate(PoolRequest::new(PROMPT, 4))
                    .await?
                    .collect()
                    .await
            })
        })
        .collect();
    for t in tasks {
        let out = t.await.unwrap().unwrap();
        assert_eq!(out.text, direct.text);
        assert_eq!(
            out.output_tokens as usize,
            direct.summary.usage.completion_tokens
        );
    }
    let s = pool.stats();
    assert_eq!((s.successes, s.retries), (2, 0));
    assert!(s.replicas.iter().all(|r| r.picks > 0), "{s:?}");

    // A request no engine can serve is rejected once, not retried.
    let long = PoolRequest::new("word ".repeat(10_000), 8);
    match pool.generate(long).await {
        Err(Error::ReplicaFailed { source, .. }) => {
            assert_eq!(source.kind(), ReplicaErrorKind::Rejected);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(pool.stats().retries, 0);

    // A shut-down engine refuses work; the pool retries on the other one.
    engines[0].shutdown().await;
    for _ in 0..2 {
        let out = pool
            .generate(PoolRequest::new(PROMPT, 4))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(out.replica, ReplicaId::new(1));
    }
    pool.shutdown().await;
}
