//! The real model's tokenizer: chat template detection and lossless round trips.
#![allow(clippy::unwrap_used)] // Helpers shared by the tests below: failures should abort loudly.
mod common;

use keel_serving::{ChatMessage, ChatTemplate, Specials, Tokenizer};
use proptest::prelude::*;

fn tokenizer() -> &'static Tokenizer {
    static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_file(common::model_path()).unwrap())
}

#[test]
fn smollm2_metadata_is_read() {
    let t = tokenizer();
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.eos_token(), Some(2));
    let im_end = t.token_id("<|im_end|>").unwrap();
    assert!(t.stop_tokens().contains(&im_end));
    let Some(ChatTemplate::ChatMl { default_system }) = t.chat_template() else {
        panic!("SmolLM2 ships a ChatML template")
    };
    assert!(
        default_system
            .as_deref()
            .unwrap()
            .starts_with("You are a helpful AI assistant named SmolLM")
    );
    // The chat fixture prompts are exactly what the template renders.
    let r = common::reference();
    let colors = r
        .generations
        .iter()
        .find(|g| g.name == "chat_colors")
        .unwrap();
    let rendered = t
        .chat_template()
        .unwrap()
        .apply(&[ChatMessage::user("Name three primary colors.")]);
    assert_eq!(rendered, colors.prompt);
    assert_eq!(
        t.encode(&rendered, Specials::Parse).unwrap(),
        colors.prompt_tokens
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn plain_text_round_trips(s in "\\PC{0,40}") {
        let t = tokenizer();
        let ids = t.encode(&s, Specials::Plain).unwrap();
        prop_assert_eq!(t.decode(&ids).unwrap(), s);
    }
}
