//! Tool calling: the request's `tools` and `tool_choice` checked, rendered through the model's
//! own chat template (or, for templates without tool support, a documented generic format),
//! the model's output parsed into `tool_calls`, and, for `tool_choice` `required` or a named
//! function, the output constrained to a call whose arguments match the function's schema.
//!
//! Formats: Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
//! (Qwen2.5 and other ChatML tool templates, and the generic format), and Llama 3's bare
//! `{"name": ..., "parameters": {...}}`.

use serde_json::{json, Value};
use tandem_engine::Grammar;
use tandem_model::ChatMessage;

use crate::error::ApiError;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// `tool_choice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// How the model writes a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ToolFormat {
    /// `<tool_call>{"name", "arguments"}</tool_call>`.
    Hermes,
    /// `{"name", "parameters"}`.
    Llama3,
}

/// A request's tools.
pub(crate) struct Tools {
    list: Value,
    names: Vec<String>,
    pub choice: ToolChoice,
    pub format: ToolFormat,
    /// Whether the chat template renders the tools itself.
    native: bool,
}

/// A call the model made.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (OpenAI's shape).
    pub arguments: String,
}

impl ToolCall {
    fn new(name: String, arguments: &Value) -> Self {
        let arguments = match arguments {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        ToolCall {
            id: format!(
                "call_{:016x}{:08x}",
                super::rand_id(),
                super::rand_id() as u32
            ),
            name,
            arguments,
        }
    }

    /// The OpenAI `tool_calls` entry (with `index` for stream deltas).
    pub fn json(&self, index: Option<usize>) -> Value {
        let mut v = json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        });
        if let Some(i) = index {
            v["index"] = json!(i);
        }
        v
    }
}

fn bad(msg: impl Into<String>, param: &str) -> ApiError {
    ApiError::invalid(msg, Some(param))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl Tools {
    /// Checks `tools` and `tool_choice`; None when no tools were given.
    pub fn from_request(
        tools: Option<Value>,
        tool_choice: Option<Value>,
        template: Option<&str>,
    ) -> Result<Option<Tools>, ApiError> {
        let Some(list) = tools.filter(|t| !t.is_null()) else {
            if tool_choice
                .as_ref()
                .is_some_and(|c| !c.is_null() && c != "none")
            {
                return Err(bad(
                    "tool_choice is only allowed when tools are given",
                    "tool_choice",
                ));
            }
            return Ok(None);
        };
        let items = list
            .as_array()
            .ok_or_else(|| bad("tools must be a list", "tools"))?;
        if items.is_empty() {
            return Err(bad("tools must not be empty", "tools"));
        }
        let mut names = Vec::with_capacity(items.len());
        for (i, t) in items.iter().enumerate() {
            let at = |what: &str| bad(format!("tools[{i}]: {what}"), "tools");
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(at("type must be \"function\""));
            }
            let f = t
                .get("function")
                .and_then(Value::as_object)
                .ok_or_else(|| at("needs a \"function\" object"))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| at("function.name is required"))?;
            if !valid_name(name) {
                return Err(at(&format!(
                    "function.name {name:?} must be 1-64 letters, digits, '_' or '-'"
                )));
            }
            if names.iter().any(|n| n == name) {
                return Err(at(&format!("function {name:?} is defined twice")));
            }
            if let Some(d) = f.get("description") {
                if !d.is_string() {
                    return Err(at("function.description must be a string"));
                }
            }
            if let Some(p) = f.get("parameters") {
                if !p.is_object() {
                    return Err(at("function.parameters must be a JSON schema object"));
                }
            }
            names.push(name.to_string());
        }
        let choice = match tool_choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(bad(
                        format!("tool_choice {other:?} is not one of none, auto, required"),
                        "tool_choice",
                    ))
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| {
                        bad(
                            "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                            "tool_choice",
                        )
                    })?;
                if !names.iter().any(|n| n == name) {
                    return Err(bad(
                        format!("tool_choice names {name:?}, which is not in tools"),
                        "tool_choice",
                    ));
                }
                ToolChoice::Named(name.to_string())
            }
        };
        let src = template.unwrap_or("");
        let native = src.contains("tools");
        let format = if native && !src.contains(OPEN) && src.contains("ipython") {
            ToolFormat::Llama3
        } else {
            ToolFormat::Hermes
        };
        Ok(Some(Tools {
            list,
            names,
            choice,
            format,
            native,
        }))
    }

    /// Whether tools are offered to the model at all (`tool_choice` is not `none`).
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The tools as the chat template's `tools` variable, when the template renders them.
    pub fn template_tools(&self) -> Option<&Value> {
        (self.active() && self.native).then_some(&self.list)
    }

    fn functions(&self) -> impl Iterator<Item = &Value> {
        self.list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.get("function"))
    }

    /// The output constraint for `required` and a named function: one call, its arguments
    /// valid against the function's parameter schema.
    pub fn grammar(&self) -> Option<Grammar> {
        let wanted: Vec<&Value> = match &self.choice {
            ToolChoice::Required => self.functions().collect(),
            ToolChoice::Named(n) => self
                .functions()
                .filter(|f| f.get("name").and_then(Value::as_str) == Some(n))
                .collect(),
            _ => return None,
        };
        let lit = |s: &str| serde_json::to_string(s).expect("a string serializes");
        let key = match self.format {
            ToolFormat::Hermes => "arguments",
            ToolFormat::Llama3 => "parameters",
        };
        let mut rules = Vec::new();
        let mut alts = Vec::new();
        for (i, f) in wanted.iter().enumerate() {
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            let schema = f
                .get("parameters")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            let head = format!("{{\"name\": {}, \"{key}\": ", lit(name));
            rules.push(format!("call_{i}: {} args_{i} \"}}\"", lit(&head)));
            rules.push(format!("args_{i}: %json {schema}"));
            alts.push(format!("call_{i}"));
        }
        let start = match self.format {
            ToolFormat::Hermes => format!(
                "start: {} call {}",
                lit(&format!("{OPEN}\n")),
                lit(&format!("\n{CLOSE}"))
            ),
            ToolFormat::Llama3 => "start: call".to_string(),
        };
        Some(Grammar::Lark(format!(
            "{start}\ncall: {}\n{}\n",
            alts.join(" | "),
            rules.join("\n")
        )))
    }

    /// The conversation as the template should see it: history tool calls with object
    /// arguments; for templates without tool support, the tools described in a system
    /// message and the history written in the generic format.
    pub fn prepare(&self, mut messages: Vec<ChatMessage>) -> Vec<ChatMessage> {
        if !self.active() || self.native {
            for m in &mut messages {
                if let Some(calls) = m.tool_calls.as_mut() {
                    object_arguments(calls);
                }
            }
            if self.native {
                return messages;
            }
        }
        let mut out = Vec::with_capacity(messages.len() + 1);
        if self.active() {
            let prompt = self.generic_prompt();
            match messages.first_mut() {
                Some(m) if m.role == "system" => {
                    m.content = format!("{}\n\n{prompt}", m.content);
                }
                _ => out.push(ChatMessage::new("system", prompt)),
            }
        }
        for mut m in messages {
            if let Some(calls) = m.tool_calls.take() {
                let mut text = m.content.clone();
                for c in calls.as_array().into_iter().flatten() {
                    let f = &c["function"];
                    let args: Value = match &f["arguments"] {
                        Value::String(s) => serde_json::from_str(s).unwrap_or(json!(s)),
                        v => v.clone(),
                    };
                    let call = json!({"name": f["name"], "arguments": args});
                    text.push_str(&format!("\n{OPEN}\n{call}\n{CLOSE}"));
                }
                m.content = text.trim_start().to_string();
            }
            if m.role == "tool" {
                m = ChatMessage::new(
                    "user",
                    format!("<tool_response>\n{}\n</tool_response>", m.content),
                );
            }
            out.push(m);
        }
        out
    }

    /// The generic format, for models whose template has no tool support.
    fn generic_prompt(&self) -> String {
        let mut s = String::from(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
        );
        for t in self.list.as_array().into_iter().flatten() {
            s.push_str(&t.to_string());
            s.push('\n');
        }
        s.push_str(
            "</tools>\n\nFor each function call, return a JSON object with the function name and \
             arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
             {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
        );
        s
    }

    /// Splits a finished output into its text and its calls.
    pub fn parse(&self, text: &str) -> (Option<String>, Vec<ToolCall>) {
        if !self.active() {
            return (Some(text.to_string()), vec![]);
        }
        let mut stream = self.stream();
        let mut deltas = stream.push(text);
        deltas.extend(stream.finish());
        let mut content = String::new();
        let mut calls = Vec::new();
        for d in deltas {
            match d {
                Delta::Content(t) => content.push_str(&t),
                Delta::Call(c) => calls.push(c),
            }
        }
        let content = (!content.trim().is_empty() || calls.is_empty()).then_some(content);
        (content, calls)
    }

    /// A parser for one streamed choice.
    pub fn stream(&self) -> ToolStream {
        ToolStream {
            format: self.format,
            active: self.active(),
            known: self.names.clone(),
            buf: String::new(),
            in_call: false,
            calls: 0,
            decided: false,
            buffering_json: false,
        }
    }
}

/// HF templates expect `arguments` as an object, OpenAI sends JSON text.
fn object_arguments(calls: &mut Value) {
    for c in calls.as_array_mut().into_iter().flatten() {
        if let Some(f) = c.get_mut("function") {
            if let Some(Value::String(s)) = f.get("arguments") {
                if let Ok(v) = serde_json::from_str::<Value>(s) {
                    f["arguments"] = v;
                }
            }
        }
    }
}

/// A piece of a streamed choice.
#[derive(Debug, PartialEq)]
pub(crate) enum Delta {
    Content(String),
    Call(ToolCall),
}

/// Splits streamed text into content and complete tool calls as they close.
pub(crate) struct ToolStream {
    format: ToolFormat,
    active: bool,
    known: Vec<String>,
    buf: String,
    in_call: bool,
    calls: usize,
    /// Llama 3: whether the output's start said call (JSON) or text.
    decided: bool,
    buffering_json: bool,
}

/// A call from its JSON text (`{"name", "arguments" | "parameters"}`), if it is one.
fn call_from_json(text: &str, known: &[String]) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    let name = v.get("name")?.as_str()?;
    if !known.iter().any(|k| k == name) {
        return None;
    }
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    Some(ToolCall::new(name.to_string(), &args))
}

/// The length of the longest suffix of `s` that is a proper prefix of `pat`.
fn partial_suffix(s: &str, pat: &str) -> usize {
    (1..pat.len().min(s.len() + 1))
        .rev()
        .find(|&k| s.is_char_boundary(s.len() - k) && s.ends_with(&pat[..k]))
        .unwrap_or(0)
}

impl ToolStream {
    fn content(&self, t: String, out: &mut Vec<Delta>) {
        // Whitespace between calls is not content.
        let between_calls = self.calls > 0 && t.trim().is_empty();
        if !t.is_empty() && !between_calls {
            out.push(Delta::Content(t));
        }
    }

    /// Feeds more text; returns what can be said now.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        let mut out = Vec::new();
        if !self.active {
            if !text.is_empty() {
                out.push(Delta::Content(text.to_string()));
            }
            return out;
        }
        self.buf.push_str(text);
        if self.format == ToolFormat::Llama3 {
            if !self.decided {
                let t = self.buf.trim_start();
                if t.is_empty() {
                    return out;
                }
                self.decided = true;
                self.buffering_json = t.starts_with('{') || t.starts_with("<|python_tag|>");
            }
            if !self.buffering_json {
                let t = std::mem::take(&mut self.buf);
                self.content(t, &mut out);
            }
            return out;
        }
        loop {
            if self.in_call {
                let Some(end) = self.buf.find(CLOSE) else {
                    break;
                };
                let body = self.buf[..end].to_string();
                self.buf.drain(..end + CLOSE.len());
                self.in_call = false;
                match call_from_json(&body, &self.known) {
                    Some(c) => {
                        self.calls += 1;
                        out.push(Delta::Call(c));
                    }
                    None => self.content(format!("{OPEN}{body}{CLOSE}"), &mut out),
                }
            } else if let Some(start) = self.buf.find(OPEN) {
                let before: String = self.buf.drain(..start).collect();
                self.content(before, &mut out);
                self.buf.drain(..OPEN.len());
                self.in_call = true;
            } else {
                let keep = partial_suffix(&self.buf, OPEN);
                let emit: String = self.buf.drain(..self.buf.len() - keep).collect();
                self.content(emit, &mut out);
                break;
            }
        }
        out
    }

    /// Ends the stream: an unclosed call is parsed as one if it can be, the rest is content.
    pub fn finish(&mut self) -> Vec<Delta> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        if !self.active {
            return out;
        }
        let json_body = if self.format == ToolFormat::Llama3 {
            self.buffering_json.then(|| {
                rest.trim_start()
                    .trim_start_matches("<|python_tag|>")
                    .to_string()
            })
        } else {
            self.in_call.then(|| rest.clone())
        };
        if let Some(body) = json_body {
            // Llama 3 may separate several calls with ';'.
            let parts: Vec<Option<ToolCall>> = body
                .split(';')
                .map(|p| call_from_json(p, &self.known))
                .collect();
            if !parts.is_empty() && parts.iter().all(Option::is_some) {
                for c in parts.into_iter().flatten() {
                    self.calls += 1;
                    out.push(Delta::Call(c));
                }
                return out;
            }
            let text = if self.format == ToolFormat::Hermes {
                format!("{OPEN}{rest}")
            } else {
                rest
            };
            self.content(text, &mut out);
            return out;
        }
        self.content(rest, &mut out);
        out
    }

    /// Calls emitted so far.
    pub fn calls(&self) -> usize {
        self.calls
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(choice: Option<Value>, template: &str) -> Tools {
        let list = json!([
            {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "add", "parameters": {"type": "object",
             "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
        ]);
        Tools::from_request(Some(list), choice, Some(template))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn bad_definitions_are_refused() {
        for (t, c) in [
            (json!({}), None),
            (json!([]), None),
            (json!([{"type": "tool", "function": {"name": "f"}}]), None),
            (
                json!([{"type": "function", "function": {"name": "has space"}}]),
                None,
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
                None,
            ),
            (
                json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
                None,
            ),
            (
                json!([{"type": "function", "function": {"name": "f"}}]),
                Some(json!("sometimes")),
            ),
            (
                json!([{"type": "function", "function": {"name": "f"}}]),
                Some(json!({"type": "function", "function": {"name": "g"}})),
            ),
        ] {
            assert!(
                Tools::from_request(Some(t.clone()), c.clone(), None).is_err(),
                "{t} {c:?}"
            );
        }
        assert!(Tools::from_request(None, Some(json!("required")), None).is_err());
        assert!(Tools::from_request(None, None, None).unwrap().is_none());
    }

    #[test]
    fn hermes_output_is_parsed_and_streamed() {
        let t = tools(None, "{% for tool in tools %}{% endfor %}<tool_call>");
        assert_eq!(t.format, ToolFormat::Hermes);
        let out = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>";
        let (content, calls) = t.parse(out);
        assert_eq!(content.as_deref(), Some("Let me check.\n"));
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(
            serde_json::from_str::<Value>(&calls[0].arguments).unwrap(),
            json!({"city": "Paris"})
        );
        // The same text streamed in small pieces gives the same deltas.
        let mut s = t.stream();
        let mut deltas = Vec::new();
        for piece in out.as_bytes().chunks(3) {
            deltas.extend(s.push(std::str::from_utf8(piece).unwrap()));
        }
        deltas.extend(s.finish());
        let content: String = deltas
            .iter()
            .filter_map(|d| match d {
                Delta::Content(c) => Some(c.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(content, "Let me check.\n");
        assert_eq!(
            deltas
                .iter()
                .filter(|d| matches!(d, Delta::Call(_)))
                .count(),
            2
        );
        // Plain text stays text; an unknown function is not a call.
        assert_eq!(t.parse("Hello <tool").0.as_deref(), Some("Hello <tool"));
        let (c, calls) = t.parse("<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>");
        assert!(calls.is_empty() && c.unwrap().contains("nope"));
    }

    #[test]
    fn llama3_json_calls() {
        let t = tools(None, "{{ tools }} <|start_header_id|>ipython");
        assert_eq!(t.format, ToolFormat::Llama3);
        let (c, calls) = t.parse("{\"name\": \"add\", \"parameters\": {\"a\": 2, \"b\": 3}}");
        assert!(c.is_none());
        assert_eq!(calls[0].name, "add");
        let (c, calls) = t.parse("The answer is 5.");
        assert_eq!((c.as_deref(), calls.len()), (Some("The answer is 5."), 0));
    }

    #[test]
    fn generic_format_for_templates_without_tools() {
        let t = tools(
            Some(json!("required")),
            "{% for m in messages %}{{ m.content }}{% endfor %}",
        );
        let history = vec![
            ChatMessage::new("user", "Weather in Paris?"),
            ChatMessage {
                tool_calls: Some(
                    json!([{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]),
                ),
                ..ChatMessage::new("assistant", "")
            },
            ChatMessage {
                tool_call_id: Some("call_1".into()),
                ..ChatMessage::new("tool", "22 C")
            },
        ];
        let m = t.prepare(history);
        assert_eq!(m[0].role, "system");
        assert!(m[0].content.contains("get_weather") && m[0].content.contains("<tool_call>"));
        assert!(
            m[2].content.contains("<tool_call>") && m[2].content.contains("\"city\":\"Paris\"")
        );
        assert_eq!(m[3].role, "user");
        assert!(m[3].content.contains("<tool_response>\n22 C"));
        let Some(Grammar::Lark(g)) = t.grammar() else {
            panic!("required constrains the output")
        };
        assert!(g.contains("%json") && g.contains("get_weather") && g.contains("add"));
        assert!(tools(Some(json!("auto")), "").grammar().is_none());
    }
}
