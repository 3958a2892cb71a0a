//! Public types are `Send + Sync` (streams are `Send`), checked at compile time.
#![allow(dead_code)] // The functions exist only to be type-checked.

use keel_serving::*;

fn send_sync<T: Send + Sync>() {}
fn send<T: Send>() {}

#[test]
fn public_types_are_send_and_sync() {
    send_sync::<Engine>();
    send_sync::<EngineBuilder>();
    send_sync::<Error>();
    send_sync::<Tokenizer>();
    send_sync::<GenerateRequest>();
    send_sync::<SamplingParams>();
    send_sync::<StreamEvent>();
    send_sync::<Summary>();
    send_sync::<Completion>();
    send_sync::<EngineMetrics>();
    send_sync::<EngineLoad>();
    send_sync::<ChatTemplate>();
    send_sync::<ModelInfo>();
    send_sync::<RandomModel>();
    send_sync::<GenerationStream>();
    send::<GenerationStream>();
}

fn generate_future_is_send(e: &'static Engine) -> impl Send {
    async move {
        let s = e.generate(GenerateRequest::text("x"))?;
        s.collect().await
    }
}
