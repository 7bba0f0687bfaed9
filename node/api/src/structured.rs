//! Structured outputs and tool calls: the grammar that a request's
//! `response_format`, `tools` and `tool_choice` ask for, the prompt that
//! tells a model its tools when its chat template does not, and the tool
//! calls read back from the answer, whole or as a stream.
//!
//! A call is written as the Hermes-style templates (Qwen2.5, SmolLM3,
//! Hermes) write it: `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`,
//! calls one per line. The grammar holds the call's name to the tools and
//! its arguments to the function's parameter schema; under `auto` the model
//! may instead answer in text (that does not open a call). A template that
//! writes these markers itself gets the tools; any other template gets the
//! conversation with the tools described in a system message.

use serde_json::{json, Value};
use weft_kernels::{ChatMessage, Grammar, Tokenizer};

use crate::error::ApiError;

/// What opens a call in the answer.
pub(crate) const CALL_OPEN: &str = "<tool_call>\n";
/// What closes it.
pub(crate) const CALL_CLOSE: &str = "\n</tool_call>";
/// Longest function name (OpenAI's limit).
const MAX_NAME: usize = 64;
/// Most tools one request may give.
const MAX_TOOLS: usize = 128;

/// The grammar `response_format` asks for (`None`: free text).
pub(crate) fn response_grammar(rf: Option<&Value>) -> Result<Option<Grammar>, ApiError> {
    let Some(rf) = rf.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let bad = |m: String| Err(ApiError::bad(m).param("response_format"));
    let Some(kind) = rf.get("type").and_then(Value::as_str) else {
        return bad("response_format needs a type: text, json_object or json_schema".into());
    };
    Ok(match kind {
        "text" => None,
        "json_object" => Some(Grammar::JsonObject),
        "json_schema" => {
            let Some(js) = rf.get("json_schema").filter(|v| v.is_object()) else {
                return bad("response_format of type json_schema needs a json_schema object".into());
            };
            match js.get("name").and_then(Value::as_str) {
                Some(n) if valid_name(n) => {}
                _ => {
                    return bad(format!(
                        "json_schema.name is required: 1 to {MAX_NAME} letters, digits, _ or -"
                    ))
                }
            }
            let schema = js.get("schema").cloned().unwrap_or_else(|| json!({}));
            if !schema.is_object() && !schema.is_boolean() {
                return bad("json_schema.schema must be a JSON Schema object".into());
            }
            Some(Grammar::JsonSchema {
                schema,
                strict: js.get("strict").and_then(Value::as_bool).unwrap_or(false),
            })
        }
        // weft's own: what vLLM calls guided_regex, guided_choice, guided_grammar
        "regex" => match rf.get("pattern").and_then(Value::as_str) {
            Some(p) => Some(Grammar::Regex { pattern: p.into() }),
            None => return bad("response_format of type regex needs a pattern".into()),
        },
        "choice" => match rf.get("choices").and_then(Value::as_array) {
            Some(c) if c.iter().all(Value::is_string) => Some(Grammar::Choice {
                options: c.iter().filter_map(Value::as_str).map(String::from).collect(),
            }),
            _ => return bad("response_format of type choice needs choices: strings".into()),
        },
        "grammar" => match rf.get("grammar").and_then(Value::as_str) {
            Some(g) => Some(Grammar::Lark { grammar: g.into() }),
            None => return bad("response_format of type grammar needs a Lark grammar".into()),
        },
        other => {
            return bad(format!(
                "unknown response_format type {other:?}: use text, json_object, json_schema, regex, choice or grammar"
            ))
        }
    })
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One function the model may call.
#[derive(Debug, Clone)]
pub(crate) struct Tool {
    pub(crate) name: String,
    /// The whole `tools` entry, as the template gets it.
    pub(crate) entry: Value,
    parameters: Value,
    strict: bool,
}

/// Reads `tools`: functions with unique valid names and object schemas.
pub(crate) fn parse_tools(tools: Option<&Value>) -> Result<Vec<Tool>, ApiError> {
    let bad = |m: String| Err(ApiError::bad(m).param("tools"));
    let list = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return bad("tools must be an array".into()),
    };
    if list.len() > MAX_TOOLS {
        return bad(format!("at most {MAX_TOOLS} tools"));
    }
    let mut out: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return bad(format!("tools[{i}].type must be \"function\""));
        }
        let Some(f) = t.get("function").filter(|f| f.is_object()) else {
            return bad(format!("tools[{i}].function is required"));
        };
        let name = match f.get("name").and_then(Value::as_str) {
            Some(n) if valid_name(n) => n.to_string(),
            _ => {
                return bad(format!(
                    "tools[{i}].function.name must be 1 to {MAX_NAME} letters, digits, _ or -"
                ))
            }
        };
        if out.iter().any(|o| o.name == name) {
            return bad(format!("two tools are named {name:?}"));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object"}),
            Some(p) if p.is_object() => p.clone(),
            Some(_) => return bad(format!("tools[{i}].function.parameters must be an object")),
        };
        out.push(Tool {
            name,
            entry: t.clone(),
            parameters,
            strict: f.get("strict").and_then(Value::as_bool).unwrap_or(false),
        });
    }
    Ok(out)
}

/// What `tool_choice` allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToolChoice {
    /// No call (the tools are not shown to the model).
    None,
    /// A call or a text answer, as the model chooses.
    Auto,
    /// At least one call.
    Required,
    /// One call of this function.
    Named(String),
}

/// Reads `tool_choice` (default: `auto` with tools, `none` without).
pub(crate) fn parse_tool_choice(v: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, ApiError> {
    let bad = |m: String| Err(ApiError::bad(m).param("tool_choice"));
    let choice = match v {
        None | Some(Value::Null) if tools.is_empty() => ToolChoice::None,
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => return bad(format!("unknown tool_choice {other:?}: use none, auto, required or a function")),
        },
        Some(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            match o.pointer("/function/name").and_then(Value::as_str) {
                Some(n) => ToolChoice::Named(n.to_string()),
                None => return bad("tool_choice.function.name is required".into()),
            }
        }
        Some(_) => return bad("tool_choice is none, auto, required or {\"type\": \"function\", \"function\": {\"name\": …}}".into()),
    };
    match &choice {
        ToolChoice::Required | ToolChoice::Auto if tools.is_empty() => {
            bad("tool_choice asks for a call but there are no tools".into())
        }
        ToolChoice::Named(n) if !tools.iter().any(|t| &t.name == n) => bad(format!(
            "tool_choice names {n:?}, which is not among the tools"
        )),
        _ => Ok(choice),
    }
}

/// Points `$ref`s written against the parameters' root (`#`, `#/$defs/…`)
/// at where the parameters sit in the call grammar (`at`).
fn rebase_refs(v: &mut Value, at: &str) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get_mut("$ref") {
                if r == "#" || r == "#/" {
                    *r = at.to_string();
                } else if let Some(rest) = r.strip_prefix("#/") {
                    *r = format!("{at}/{rest}");
                }
            }
            o.values_mut().for_each(|x| rebase_refs(x, at));
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rebase_refs(x, at)),
        _ => {}
    }
}

/// The schema of one call of `t`: its name, and arguments of its
/// parameters, whose references now point under `at` (where this schema
/// sits in the grammar's document).
fn call_schema(t: &Tool, at: &str) -> Value {
    let mut parameters = t.parameters.clone();
    rebase_refs(&mut parameters, &format!("{at}/properties/arguments"));
    json!({
        "type": "object",
        "properties": {
            "name": {"const": t.name},
            "arguments": parameters,
        },
        "required": ["name", "arguments"],
        "additionalProperties": false,
    })
}

/// The grammar of an answer under `choice` (`None`: no calls to constrain,
/// `text` alone). A text answer under `auto` follows `text` when given,
/// and otherwise is any text that does not open a call.
pub(crate) fn tool_grammar(
    tools: &[Tool],
    choice: &ToolChoice,
    parallel: bool,
    text: Option<&Grammar>,
) -> Result<Option<Grammar>, ApiError> {
    let callable: Vec<&Tool> = match choice {
        ToolChoice::None => return Ok(text.cloned()),
        ToolChoice::Named(n) => tools.iter().filter(|t| &t.name == n).collect(),
        _ => tools.iter().collect(),
    };
    let strict = callable.iter().all(|t| t.strict);
    if text.is_some() && *choice != ToolChoice::Auto {
        return Err(ApiError::bad(
            "a response_format applies to a text answer: it cannot be combined with tool_choice required or a named function",
        )
        .param("response_format"));
    }
    let body = if callable.len() == 1 {
        call_schema(callable[0], "#")
    } else {
        json!({"anyOf": callable.iter().enumerate().map(|(i, t)| call_schema(t, &format!("#/anyOf/{i}"))).collect::<Vec<_>>()})
    };
    let open = serde_json::to_string(CALL_OPEN).expect("a string serializes");
    let close = serde_json::to_string(CALL_CLOSE).expect("a string serializes");
    let mut lark = format!(
        "call: {open} body {close}\nbody: %json {}\n",
        Grammar::embedded_json(&body, strict)
    );
    let many = parallel && !matches!(choice, ToolChoice::Named(_));
    // a line break may end the answer (models end a line before their
    // end-of-turn), or begin the next call
    lark.push_str(if many {
        "calls: call (\"\\n\" call)* \"\\n\"?\n"
    } else {
        "calls: call \"\\n\"?\n"
    });
    match choice {
        ToolChoice::Auto => {
            let answer = match text {
                None => "TEXT: /(.|\\n)+/ & ~/<tool_call>(.|\\n)*/\nanswer: TEXT\n".to_string(),
                Some(Grammar::JsonObject) => format!(
                    "answer: %json {}\n",
                    Grammar::embedded_json(&json!({"type": "object"}), false)
                ),
                Some(Grammar::JsonSchema { schema, strict }) => format!(
                    "answer: %json {}\n",
                    Grammar::embedded_json(schema, *strict)
                ),
                Some(g) => {
                    return Err(ApiError::bad(format!(
                        "a response_format of type {} cannot be combined with tools under tool_choice auto",
                        g.kind()
                    ))
                    .param("response_format"))
                }
            };
            lark.push_str(&answer);
            lark.push_str("start: calls | answer\n");
        }
        _ => lark.push_str("start: calls\n"),
    }
    Ok(Some(Grammar::Lark { grammar: lark }))
}

/// Whether `tokenizer`'s chat template writes calls in our markers itself
/// (and so takes the tools and earlier calls as they are).
fn template_writes_calls(tokenizer: &Tokenizer) -> bool {
    tokenizer
        .chat_template()
        .is_ok_and(|t| t.source().contains("<tool_call>"))
}

/// A call as the answer writes it.
fn call_text(name: &str, arguments: &Value) -> String {
    let args = match arguments {
        // OpenAI sends arguments as JSON text
        Value::String(s) => serde_json::from_str::<Value>(s).unwrap_or_else(|_| arguments.clone()),
        v => v.clone(),
    };
    format!(
        "{CALL_OPEN}{}{CALL_CLOSE}",
        json!({"name": name, "arguments": args})
    )
}

/// The messages and tools to render: as they are for a template that
/// writes our markers; otherwise the tools described in a system message,
/// earlier calls written into their assistant message's text and tool
/// results as user turns.
pub(crate) fn conversation(
    tokenizer: &Tokenizer,
    mut messages: Vec<ChatMessage>,
    tools: &[Tool],
    choice: &ToolChoice,
) -> (Vec<ChatMessage>, Option<Value>) {
    let shown = *choice != ToolChoice::None && !tools.is_empty();
    if template_writes_calls(tokenizer) {
        // such templates write the arguments as JSON (`| tojson`): an
        // object, not OpenAI's text of one
        for m in messages.iter_mut() {
            for c in m
                .tool_calls
                .iter_mut()
                .filter_map(Value::as_array_mut)
                .flatten()
            {
                if let Some(a) = c.pointer_mut("/function/arguments") {
                    if let Some(v) = a
                        .as_str()
                        .and_then(|s| serde_json::from_str::<Value>(s).ok())
                    {
                        *a = v;
                    }
                }
            }
        }
        let list = shown.then(|| Value::Array(tools.iter().map(|t| t.entry.clone()).collect()));
        return (messages, list);
    }
    for m in messages.iter_mut() {
        if let Some(Value::Array(calls)) = m.tool_calls.take() {
            let written: Vec<String> = calls
                .iter()
                .filter_map(|c| {
                    let f = c.get("function")?;
                    Some(call_text(
                        f.get("name")?.as_str()?,
                        f.get("arguments").unwrap_or(&Value::Null),
                    ))
                })
                .collect();
            if !m.content.is_empty() && !written.is_empty() {
                m.content.push('\n');
            }
            m.content.push_str(&written.join("\n"));
        }
        if m.role == "tool" {
            m.role = "user".into();
            m.content = format!("<tool_response>\n{}\n</tool_response>", m.content);
            m.tool_call_id = None;
            m.name = None;
        }
    }
    let mut messages = merge_tool_results(messages);
    if shown {
        let mut sys = String::from(
            "You can call functions. They are listed in <tools></tools>, one JSON object each:\n<tools>\n",
        );
        for t in tools {
            sys.push_str(&t.entry.to_string());
            sys.push('\n');
        }
        sys.push_str(
            "</tools>\nTo call one, answer with\n<tool_call>\n{\"name\": <the function's name>, \"arguments\": <its arguments as a JSON object>}\n</tool_call>\nand nothing else. A function's result comes back in <tool_response></tool_response>.",
        );
        match messages.first_mut() {
            Some(m) if m.role == "system" => {
                m.content = format!("{}\n\n{sys}", m.content);
            }
            _ => messages.insert(0, ChatMessage::new("system", sys)),
        }
    }
    (messages, None)
}

/// The results of parallel calls (tool results as user turns, in a row)
/// as one user turn: templates that insist on alternating roles refuse two
/// in a row.
fn merge_tool_results(messages: Vec<ChatMessage>) -> Vec<ChatMessage> {
    let mut merged: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    for m in messages {
        match merged.last_mut() {
            Some(prev)
                if prev.role == "user"
                    && m.role == "user"
                    && prev.content.starts_with("<tool_response>")
                    && m.content.starts_with("<tool_response>") =>
            {
                prev.content.push('\n');
                prev.content.push_str(&m.content);
            }
            _ => merged.push(m),
        }
    }
    merged
}

/// A piece of an answer that may hold calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Text for `content`.
    Text(String),
    /// A whole call: its index among the answer's calls, name and
    /// arguments (JSON text).
    Call {
        index: usize,
        name: String,
        arguments: String,
    },
}

/// Splits an answer into text and calls as it arrives: text that may still
/// open a call is held back, a call goes out when it is closed.
#[derive(Debug, Default)]
pub(crate) struct CallSplitter {
    buf: String,
    /// Whether the answer opened with a call (`None`: not known yet).
    calls: Option<bool>,
    count: usize,
}

impl CallSplitter {
    /// Takes the next text of the answer; returns what is final.
    pub(crate) fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        if self.calls.is_none() {
            if self.buf.starts_with(CALL_OPEN) {
                self.calls = Some(true);
            } else if CALL_OPEN.starts_with(self.buf.as_str()) {
                return out;
            } else {
                self.calls = Some(false);
            }
        }
        if self.calls == Some(false) {
            if !self.buf.is_empty() {
                out.push(Piece::Text(std::mem::take(&mut self.buf)));
            }
            return out;
        }
        loop {
            let rest = self.buf.trim_start_matches('\n');
            let Some(body) = rest.strip_prefix(CALL_OPEN) else {
                break;
            };
            let Some(end) = body.find(CALL_CLOSE) else {
                break;
            };
            let parsed: Option<(String, String)> = serde_json::from_str::<Value>(&body[..end])
                .ok()
                .and_then(|v| {
                    Some((
                        v.get("name")?.as_str()?.to_string(),
                        v.get("arguments")?.to_string(),
                    ))
                });
            let Some((name, arguments)) = parsed else {
                break;
            };
            let used = self.buf.len() - body.len() + end + CALL_CLOSE.len();
            self.buf.drain(..used);
            out.push(Piece::Call {
                index: self.count,
                name,
                arguments,
            });
            self.count += 1;
        }
        out
    }

    /// The end of the answer: what was held back, as text.
    pub(crate) fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.buf);
        let rest = if self.count > 0 {
            rest.trim_matches('\n').to_string()
        } else {
            rest
        };
        if rest.is_empty() {
            Vec::new()
        } else {
            vec![Piece::Text(rest)]
        }
    }

    /// Calls given out so far.
    pub(crate) fn calls(&self) -> usize {
        self.count
    }
}

/// An id for a call: `call_` and 24 random hex digits.
pub(crate) fn call_id() -> String {
    use rand_core::RngCore;
    let mut b = [0u8; 12];
    rand_core::OsRng.fill_bytes(&mut b);
    format!("call_{}", hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(parts: &[&str]) -> Vec<Piece> {
        let mut s = CallSplitter::default();
        let mut out: Vec<Piece> = parts.iter().flat_map(|p| s.push(p)).collect();
        out.extend(s.finish());
        out
    }

    #[test]
    fn the_results_of_parallel_calls_become_one_user_turn() {
        let m = |r: &str, c: &str| ChatMessage::new(r, c);
        let out = merge_tool_results(vec![
            m("user", "q"),
            m("assistant", "calls"),
            m("user", "<tool_response>\n1\n</tool_response>"),
            m("user", "<tool_response>\n2\n</tool_response>"),
            m("user", "thanks"),
        ]);
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "user", "user"]);
        assert!(out[2]
            .content
            .contains("1\n</tool_response>\n<tool_response>\n2"));
    }

    #[test]
    fn refs_in_a_tools_parameters_point_under_its_arguments() {
        let mut p = json!({"$defs": {"pt": {"type": "integer"}}, "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#"}}});
        rebase_refs(&mut p, "#/anyOf/1/properties/arguments");
        assert_eq!(
            p["properties"]["a"]["$ref"],
            "#/anyOf/1/properties/arguments/$defs/pt"
        );
        assert_eq!(
            p["properties"]["b"]["$ref"],
            "#/anyOf/1/properties/arguments"
        );
    }

    #[test]
    fn text_that_does_not_open_a_call_passes_as_text() {
        assert_eq!(
            split_all(&["<to", "ol box"]),
            vec![Piece::Text("<tool box".into())]
        );
    }

    #[test]
    fn calls_split_at_any_point_come_out_whole_in_order() {
        let answer = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
        let want = vec![
            Piece::Call {
                index: 0,
                name: "a".into(),
                arguments: "{\"x\":1}".into(),
            },
            Piece::Call {
                index: 1,
                name: "b".into(),
                arguments: "{}".into(),
            },
        ];
        for cut in 1..answer.len() {
            let (a, b) = answer.split_at(cut);
            assert_eq!(split_all(&[a, b]), want, "cut at {cut}");
        }
    }

    #[test]
    fn a_call_cut_short_comes_back_as_text() {
        let out = split_all(&["<tool_call>\n{\"name\": \"a\", \"argu"]);
        assert_eq!(
            out,
            vec![Piece::Text("<tool_call>\n{\"name\": \"a\", \"argu".into())]
        );
    }
}
