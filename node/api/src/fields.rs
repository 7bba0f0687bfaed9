//! No field is silently ignored: every top-level field of a chat or
//! completion request is one weft implements with OpenAI's meaning, one it
//! accepts only with a value it can honour, or a 400 naming it.

use serde_json::Value;

use crate::error::ApiError;
use crate::request::Kind;

/// Fields both endpoints implement (`weft`, `top_k`, `min_p` and
/// `repetition_penalty` are weft's own; `response_format` on completions
/// too). `user`, `safety_identifier` and `prompt_cache_key` are
/// identifiers for the caller's own bookkeeping: accepted, and `user` goes
/// to the intent log.
const COMMON: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "response_format",
    "user",
    "weft",
];

/// Chat's own implemented fields.
const CHAT: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "safety_identifier",
    "prompt_cache_key",
];

/// Completions' own implemented fields.
const COMPLETION: &[&str] = &["prompt"];

/// Fields refused, with why.
const REFUSED: &[(&str, &str)] = &[
    ("logit_bias", "logit_bias is not supported"),
    (
        "audio",
        "audio output is not supported: weft serves text models",
    ),
    ("prediction", "predicted outputs are not supported"),
    (
        "reasoning_effort",
        "reasoning_effort is not supported: weft's models do not reason in hidden tokens",
    ),
    ("web_search_options", "web search is not supported"),
    ("verbosity", "verbosity is not supported"),
    (
        "metadata",
        "metadata is kept with stored completions, and weft stores none",
    ),
    (
        "functions",
        "functions is deprecated and not supported: use tools",
    ),
    (
        "function_call",
        "function_call is deprecated and not supported: use tool_choice",
    ),
];

/// The field at fault, if any.
pub(crate) fn check(kind: Kind, body: &[u8]) -> Result<(), ApiError> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        // the typed parse says what is wrong
        return Ok(());
    };
    for (k, v) in &map {
        let field = k.as_str();
        let own = match kind {
            Kind::Chat => CHAT,
            Kind::Completion => COMPLETION,
        };
        if COMMON.contains(&field) || own.contains(&field) {
            continue;
        }
        let refuse = |why: String| Err(ApiError::bad(why).param(field.to_string()));
        if let Some((_, why)) = REFUSED.iter().find(|(f, _)| *f == field) {
            if v.is_null() {
                continue;
            }
            return refuse((*why).to_string());
        }
        // accepted only with the value weft honours anyway
        let honoured = match (kind, field) {
            (Kind::Chat, "store") => v.is_null() || v == &Value::Bool(false),
            (Kind::Chat, "modalities") => {
                v.is_null() || v.as_array().is_some_and(|a| a.iter().all(|m| m == "text"))
            }
            (Kind::Chat, "service_tier") => v.is_null() || v == "auto" || v == "default",
            (Kind::Completion, "best_of") => v.is_null() || v == 1,
            (Kind::Completion, "echo") => v.is_null() || v == &Value::Bool(false),
            (Kind::Completion, "suffix") => v.is_null() || v == "",
            _ => {
                return refuse(format!("unknown field {field:?}"));
            }
        };
        if !honoured {
            let why = match field {
                "store" => "store: true is not supported: weft stores no completions",
                "modalities" => "only the text modality is supported",
                "service_tier" => "service_tier takes auto or default",
                "best_of" => "only best_of = 1 is supported",
                "echo" => "echo is not supported",
                _ => "suffix is not supported",
            };
            return refuse(why.to_string());
        }
    }
    Ok(())
}
