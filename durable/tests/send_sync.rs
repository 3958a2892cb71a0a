//! Compile-time check that every public type is `Send + Sync` (and the futures `Send`).

use keel_durable::*;

fn assert_send_sync<T: Send + Sync>() {}
fn assert_send<T: Send>(_: &T) {}

#[test]
fn public_types_are_send_and_sync() {
    assert_send_sync::<Runtime>();
    assert_send_sync::<RuntimeBuilder>();
    assert_send_sync::<Worker>();
    assert_send_sync::<Handle>();
    assert_send_sync::<Context>();
    assert_send_sync::<ChildHandle>();
    assert_send_sync::<Error>();
    assert_send_sync::<StorageError>();
    assert_send_sync::<WorkflowId>();
    assert_send_sync::<WorkflowInfo>();
    assert_send_sync::<WorkflowStatus>();
    assert_send_sync::<HistoryEntry>();
    assert_send_sync::<PendingSignal>();
    assert_send_sync::<ListFilter>();
    assert_send_sync::<StartOptions>();
    assert_send_sync::<QueueConfig>();
    assert_send_sync::<RetryPolicy>();
    assert_send_sync::<StepError>();
    assert_send_sync::<Durability>();
    assert_send_sync::<Issue>();
    assert_send_sync::<JournalStats>();
}

#[allow(dead_code)] // only type-checked: the futures must be `Send` to spawn them
fn futures_are_send(rt: Runtime, ctx: Context, h: Handle, w: Worker, id: WorkflowId) {
    assert_send(&rt.start("a", &id, &1u8));
    assert_send(&rt.signal(&id, "s", &1u8));
    assert_send(&rt.cancel(&id));
    assert_send(&rt.shutdown());
    assert_send(&h.result::<u8>());
    assert_send(&w.run());
    assert_send(&ctx.step("s", || async { Ok::<u8, StepError>(1) }));
    assert_send(&ctx.sleep(std::time::Duration::from_secs(1)));
    assert_send(&ctx.recv::<u8>("s"));
    assert_send(&ctx.child::<u8, u8>("c", &1));
    assert_send(&ctx.now());
    assert_send(&ctx.version("v", 0, 1));
}
