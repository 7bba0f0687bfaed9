//! Structured outputs and tool calls through `weft up` with the tiny
//! random-weight model: whatever the weights say, the answers match what
//! was asked for; what weft cannot do is refused by name before any token.

use std::process::Command;

use serde_json::{json, Value};

mod common;
use common::{chunks, client, post, sse, start, Node};

fn generated(node: &Node) -> u64 {
    let m = client()
        .get(format!("{}/metrics", node.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    m.lines()
        .find(|l| l.starts_with("weft_generated_tokens_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

fn chat(extra: Value) -> Value {
    let mut b = json!({
        "model": "tiny-gemma",
        "messages": [{"role": "user", "content": "weather in Paris?"}],
        "max_tokens": 120,
        "temperature": 1.0,
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

fn pet_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "kind": {"enum": ["cat", "dog"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 20},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2}
        },
        "required": ["kind", "age", "tags"],
        "additionalProperties": false
    })
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
            "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": false}}}
    ])
}

fn check_pet(v: &Value) {
    assert!(["cat", "dog"].contains(&v["kind"].as_str().unwrap()), "{v}");
    assert!((0..=20).contains(&v["age"].as_i64().unwrap()), "{v}");
    let tags = v["tags"].as_array().unwrap();
    assert!((1..=2).contains(&tags.len()), "{v}");
    assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
}

fn check_call(c: &Value) {
    assert_eq!(c["type"], "function");
    assert!(c["id"].as_str().unwrap().starts_with("call_"));
    let args: Value = serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
    match c["function"]["name"].as_str().unwrap() {
        "get_weather" => {
            assert!(["Paris", "Oslo"].contains(&args["city"].as_str().unwrap()));
            assert!(["c", "f"].contains(&args["unit"].as_str().unwrap()));
        }
        "get_time" => assert!(["UTC", "CET"].contains(&args["zone"].as_str().unwrap())),
        other => panic!("a call of {other:?}, which is not a tool"),
    }
}

#[test]
fn a_json_schema_answer_parses_and_matches_the_schema() {
    let n = start("");
    for seed in 0..4 {
        let rf = json!({"type": "json_schema", "json_schema": {"name": "pet", "schema": pet_schema(), "strict": true}});
        let (st, v) = post(
            &n,
            "/v1/chat/completions",
            &chat(json!({"response_format": rf, "seed": seed})),
        );
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        check_pet(&serde_json::from_str(text).unwrap());
    }
}

#[test]
fn a_json_object_completion_starts_an_object() {
    let n = start("");
    let (st, v) = post(
        &n,
        "/v1/completions",
        &json!({"model": "tiny-gemma", "prompt": "{", "max_tokens": 200, "temperature": 0,
            "response_format": {"type": "json_object"}}),
    );
    assert_eq!(st, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with('{'), "{text:?}");
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(text).unwrap().is_object());
    }
}

#[test]
fn an_invalid_schema_is_a_400_naming_response_format_before_any_token() {
    let n = start("");
    let before = generated(&n);
    let rf = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}});
    let (st, v) = post(
        &n,
        "/v1/chat/completions",
        &chat(json!({"response_format": rf})),
    );
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "response_format");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("nonsense"),
        "{v}"
    );
    assert_eq!(generated(&n), before, "a token was generated");
}

#[test]
fn an_unknown_response_format_type_is_a_400() {
    let n = start("");
    let (st, v) = post(
        &n,
        "/v1/chat/completions",
        &chat(json!({"response_format": {"type": "yaml"}})),
    );
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "response_format");
}

#[test]
fn tool_choice_required_always_yields_calls_of_the_tools_with_valid_arguments() {
    let n = start("");
    for seed in 0..4 {
        let (st, v) = post(
            &n,
            "/v1/chat/completions",
            &chat(json!({"tools": weather_tools(), "tool_choice": "required", "seed": seed})),
        );
        assert_eq!(st, 200, "{v}");
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty());
        calls.iter().for_each(check_call);
    }
}

#[test]
fn a_named_tool_choice_calls_that_function_once() {
    let n = start("");
    for seed in 0..3 {
        let (st, v) = post(
            &n,
            "/v1/chat/completions",
            &chat(json!({"tools": weather_tools(), "seed": seed,
                "tool_choice": {"type": "function", "function": {"name": "get_time"}}})),
        );
        assert_eq!(st, 200, "{v}");
        let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["function"]["name"], "get_time");
        check_call(&calls[0]);
    }
}

#[test]
fn a_streamed_tool_call_reassembles_to_the_whole_answers_call() {
    let n = start("");
    let body = chat(json!({"tools": weather_tools(), "tool_choice": "required", "seed": 7}));
    let (_, whole) = post(&n, "/v1/chat/completions", &body);
    let mut b = body.clone();
    b["stream"] = json!(true);
    let chunks = chunks(&sse(&n, "/v1/chat/completions", &b));
    // as the official client reassembles them: by index, names and
    // argument pieces appended
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = Value::Null;
    for c in &chunks {
        let ch = &c["choices"][0];
        if !ch["finish_reason"].is_null() {
            finish = ch["finish_reason"].clone();
        }
        for tc in ch["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                calls.push(Default::default());
            }
            let e = &mut calls[i];
            if let Some(id) = tc["id"].as_str() {
                e.0 = id.into();
            }
            e.1 += tc["function"]["name"].as_str().unwrap_or("");
            e.2 += tc["function"]["arguments"].as_str().unwrap_or("");
        }
    }
    assert_eq!(finish, "tool_calls");
    let want: Vec<(String, String)> = whole["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["function"]["name"].as_str().unwrap().to_string(),
                c["function"]["arguments"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let got: Vec<(String, String)> = calls.iter().map(|c| (c.1.clone(), c.2.clone())).collect();
    assert_eq!(got, want);
    assert!(calls.iter().all(|c| c.0.starts_with("call_")));
}

#[test]
fn a_conversation_with_an_earlier_call_and_its_result_is_answered() {
    let n = start("");
    let messages = json!([
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}
    ]);
    let (st, v) = post(
        &n,
        "/v1/chat/completions",
        &chat(json!({"messages": messages, "tools": weather_tools(), "max_tokens": 8})),
    );
    assert_eq!(st, 200, "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 20);
}

#[test]
fn a_tool_whose_parameters_use_refs_is_called_with_arguments_matching_them() {
    let n = start("");
    let tools = json!([{"type": "function", "function": {"name": "move_to", "parameters": {
        "$defs": {"axis": {"enum": ["x", "y"]}},
        "type": "object", "properties": {"axis": {"$ref": "#/$defs/axis"}}, "required": ["axis"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "noop"}}]);
    for seed in 0..3 {
        let (st, v) = post(
            &n,
            "/v1/chat/completions",
            &chat(json!({"tools": tools, "seed": seed,
                "tool_choice": {"type": "function", "function": {"name": "move_to"}}})),
        );
        assert_eq!(st, 200, "{v}");
        let call = &v["choices"][0]["message"]["tool_calls"][0];
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(
            ["x", "y"].contains(&args["axis"].as_str().unwrap()),
            "{args}"
        );
        // a function tool_choice names ends as OpenAI ends it
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
}

#[test]
fn a_response_format_with_a_required_tool_call_is_a_400() {
    let n = start("");
    let (st, v) = post(
        &n,
        "/v1/chat/completions",
        &chat(json!({"tools": weather_tools(), "tool_choice": "required",
            "response_format": {"type": "json_object"}})),
    );
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "response_format");
}

#[test]
fn a_tool_choice_naming_no_tool_is_a_400() {
    let n = start("");
    let (st, v) = post(
        &n,
        "/v1/chat/completions",
        &chat(
            json!({"tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "rm_rf"}}}),
        ),
    );
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "tool_choice");
}

#[test]
fn a_tool_with_an_invalid_name_is_a_400() {
    let n = start("");
    let tools = json!([{"type": "function", "function": {"name": "no spaces please"}}]);
    let (st, v) = post(&n, "/v1/chat/completions", &chat(json!({"tools": tools})));
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "tools");
}

/// Fields of OpenAI's chat request weft does not implement, with a value
/// a client would send.
fn refused_chat_fields() -> Vec<(&'static str, Value)> {
    vec![
        ("logit_bias", json!({"50": -100})),
        ("audio", json!({"voice": "alloy", "format": "wav"})),
        ("prediction", json!({"type": "content", "content": "x"})),
        ("reasoning_effort", json!("low")),
        ("web_search_options", json!({})),
        ("verbosity", json!("low")),
        ("metadata", json!({"k": "v"})),
        ("functions", json!([{"name": "f"}])),
        ("function_call", json!("auto")),
        ("store", json!(true)),
        ("modalities", json!(["text", "audio"])),
        ("service_tier", json!("flex")),
        ("n", json!(2)),
        ("no_such_field", json!(1)),
    ]
}

#[test]
fn every_chat_field_weft_does_not_implement_is_a_400_naming_it() {
    let n = start("");
    for (field, value) in refused_chat_fields() {
        let (st, v) = post(&n, "/v1/chat/completions", &chat(json!({field: value})));
        assert_eq!(st, 400, "{field}: {v}");
        assert_eq!(v["error"]["param"], field, "{v}");
    }
}

#[test]
fn every_completion_field_weft_does_not_implement_is_a_400_naming_it() {
    let n = start("");
    for (field, value) in [
        ("logit_bias", json!({"50": -100})),
        ("best_of", json!(3)),
        ("echo", json!(true)),
        ("suffix", json!("end")),
        ("n", json!(2)),
        ("tools", json!([])),
    ] {
        let (st, v) = post(
            &n,
            "/v1/completions",
            &json!({"model": "tiny-gemma", "prompt": "hi", "max_tokens": 2, field: value}),
        );
        assert_eq!(st, 400, "{field}: {v}");
        assert_eq!(v["error"]["param"], field, "{v}");
    }
}

#[test]
fn the_fields_weft_implements_are_accepted_together() {
    let n = start("");
    let body = chat(json!({
        "max_completion_tokens": 4, "top_p": 0.9, "frequency_penalty": 0.1, "presence_penalty": 0.1,
        "stop": ["zzz"], "seed": 1, "n": 1, "stream": false, "stream_options": null, "logprobs": true,
        "top_logprobs": 1, "response_format": {"type": "text"}, "tools": weather_tools(), "tool_choice": "none",
        "parallel_tool_calls": false, "user": "u-1", "safety_identifier": "s-1", "prompt_cache_key": "k",
        "store": false, "modalities": ["text"], "service_tier": "auto", "logit_bias": null,
        "weft": {"criticality": "standard"}
    }));
    let (st, v) = post(&n, "/v1/chat/completions", &body);
    assert_eq!(st, 200, "{v}");
    assert!(
        v["choices"][0]["message"]["tool_calls"].is_null(),
        "tool_choice none: {v}"
    );
}

#[test]
fn the_intent_log_says_a_request_was_constrained() {
    let logs = tempfile::tempdir().unwrap();
    let dir = logs.path().join("intent");
    let mut node = start(&format!("intent_log = \"{}\"\n", dir.display()));
    let (st, _) = post(
        &node,
        "/v1/chat/completions",
        &chat(json!({"tools": weather_tools(), "tool_choice": "required"})),
    );
    assert_eq!(st, 200);
    let (st, _) = post(
        &node,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 2})),
    );
    assert_eq!(st, 200);
    Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(node.child.wait().unwrap().success());
    let text = std::fs::read_to_string(dir.join("intent-000000.jsonl")).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["record"].clone())
        .filter(|r| r["decision"] == "admitted")
        .collect();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["constrained"]["kind"], "tools");
    assert!(records[0]["constrained"]["grammar_key"].is_string());
    assert!(records[1]["constrained"].is_null());
}
