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
    /// Llama 2 chat: `<s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] answer </s>`, one
    /// `<s>[INST]` per user turn.
    Llama2,
    /// Mistral instruct: `<s>[INST] user [/INST]answer</s>[INST] ...`; a system message, which
    /// these templates have no slot for, is put before the first user message.
    Mistral,
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
        } else if template.contains("[INST]") {
            if template.contains("<<SYS>>") {
                Ok(Self::Llama2)
            } else {
                Ok(Self::Mistral)
            }
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
            Self::Llama2 | Self::Mistral => self.apply_inst(messages, &mut s),
        }
        s
    }

    /// The `[INST]` families: the system message folds into the first user turn (inside
    /// `<<SYS>>` tags for Llama 2), each user turn is wrapped in `[INST] … [/INST]`, and each
    /// earlier answer is closed with `</s>`.
    fn apply_inst(&self, messages: &[ChatMessage], s: &mut String) {
        let llama2 = matches!(self, Self::Llama2);
        let mut system: Option<&str> = None;
        let mut first_user = true;
        s.push_str("<s>");
        for m in messages {
            match m.role {
                Role::System => system = Some(m.content.trim()),
                Role::User => {
                    if llama2 && !first_user {
                        s.push_str("<s>");
                    }
                    s.push_str("[INST] ");
                    if let Some(sys) = system.take().filter(|_| first_user) {
                        if llama2 {
                            s.push_str(&format!("<<SYS>>\n{sys}\n<</SYS>>\n\n"));
                        } else {
                            s.push_str(&format!("{sys}\n\n"));
                        }
                    }
                    s.push_str(m.content.trim());
                    s.push_str(" [/INST]");
                    first_user = false;
                }
                Role::Assistant => {
                    if llama2 {
                        s.push_str(&format!(" {} </s>", m.content.trim()));
                    } else {
                        s.push_str(&format!("{}</s>", m.content.trim()));
                    }
                }
            }
        }
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
        assert!(ChatTemplate::detect("{{ messages | tojson }}").is_err());
    }

    #[test]
    fn inst_families_are_told_apart_and_rendered() {
        let llama2 = "{% if messages[0]['role'] == 'system' %}{% set system_message = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% endif %}{{ bos_token + '[INST] ' }}";
        let mistral = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}";
        assert_eq!(ChatTemplate::detect(llama2).unwrap(), ChatTemplate::Llama2);
        assert_eq!(
            ChatTemplate::detect(mistral).unwrap(),
            ChatTemplate::Mistral
        );
        let conv = [
            ChatMessage::system("Be brief."),
            ChatMessage::user("Hi"),
            ChatMessage::new(Role::Assistant, "Hello."),
            ChatMessage::user("Sky colour?"),
        ];
        assert_eq!(
            ChatTemplate::Llama2.apply(&conv),
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Sky colour? [/INST]"
        );
        assert_eq!(
            ChatTemplate::Mistral.apply(&conv),
            "<s>[INST] Be brief.\n\nHi [/INST]Hello.</s>[INST] Sky colour? [/INST]"
        );
        assert_eq!(
            ChatTemplate::Mistral.apply(&[ChatMessage::user("x")]),
            "<s>[INST] x [/INST]"
        );
    }
}
