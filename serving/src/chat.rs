//! Chat templates for instruct models, detected from `tokenizer.chat_template`: we recognise
//! the common template families rather than run a general Jinja interpreter.

use crate::error::{Error, Result};

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The person talking to the model.
    User,
    /// The model's own earlier replies.
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChatMessage {
    role: Role,
    content: String,
}

impl ChatMessage {
    /// A message from `role` with `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// Who wrote the message.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The message text.
    pub fn content(&self) -> &str {
        &self.content
    }
}

/// A chat template family recognised from a model's Jinja template.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (SmolLM2, Qwen2), with the default system
    /// prompt the template inserts when the conversation has none.
    ChatMl {
        /// System prompt added when the first message is not a system message.
        default_system: Option<String>,
    },
    /// Llama 3's `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`.
    Llama3,
}

impl ChatTemplate {
    /// Recognises the family of a Jinja chat template.
    ///
    /// # Errors
    /// Returns [`Error::UnsupportedChatTemplate`] for templates of other families.
    pub fn detect(template: &str) -> Result<Self> {
        if template.contains("<|im_start|>") {
            let marker = "<|im_start|>system\n";
            let default_system = template
                .find("messages[0]['role'] != 'system'")
                .and_then(|at| {
                    let rest = &template[at..];
                    let start = rest.find(marker)? + marker.len();
                    let end = rest[start..].find("<|im_end|>")? + start;
                    Some(rest[start..end].to_string())
                });
            Ok(Self::ChatMl { default_system })
        } else if template.contains("<|start_header_id|>") {
            Ok(Self::Llama3)
        } else {
            Err(Error::UnsupportedChatTemplate {
                snippet: template.chars().take(80).collect(),
            })
        }
    }

    /// Renders a conversation as prompt text (to be encoded with special tokens parsed),
    /// ending with the opening of the assistant's turn.
    pub fn apply(&self, messages: &[ChatMessage]) -> String {
        let mut s = String::new();
        match self {
            Self::ChatMl { default_system } => {
                if let Some(sys) = default_system
                    && messages.first().is_none_or(|m| m.role != Role::System)
                {
                    s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
                }
                for m in messages {
                    s.push_str(&format!(
                        "<|im_start|>{}\n{}<|im_end|>\n",
                        m.role.as_str(),
                        m.content
                    ));
                }
                s.push_str("<|im_start|>assistant\n");
            }
            Self::Llama3 => {
                s.push_str("<|begin_of_text|>");
                for m in messages {
                    s.push_str(&format!(
                        "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>",
                        m.role.as_str(),
                        m.content.trim()
                    ));
                }
                s.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_with_default_system() {
        let t = "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are nice<|im_end|>\n' }}{% endif %}";
        let c = ChatTemplate::detect(t).unwrap();
        assert_eq!(
            c.apply(&[ChatMessage::user("hi")]),
            "<|im_start|>system\nYou are nice<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(
            !c.apply(&[ChatMessage::system("s"), ChatMessage::user("hi")])
                .contains("nice")
        );
        assert!(ChatTemplate::detect("{{ [INST] }}").is_err());
    }
}
