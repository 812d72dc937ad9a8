//! Test cases for a filter file: what `switchyard filter test FILE --cases CASES`
//! runs. A cases file is a JSON array of
//!
//! ```json
//! {
//!   "name": "a member without the role does not see the channel",
//!   "event": {"topic": "guild.1", "headers": {"channel_id": "10"}, "payload": {"content": "hi"}},
//!   "subscription": {"id": 1, "context": {"roles": "20"}},
//!   "expect": false
//! }
//! ```
//!
//! `payload` may be any JSON value (sent as its JSON text) or a string (sent as is);
//! `topic` defaults to `guild.1`, `headers`, `payload` and `context` to empty.

use std::path::Path;

use crate::filter::{Context, EventView, FilterLimits, FilterSet, SharedVerdicts, evaluate};

/// One case's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    /// What happened when it did not pass.
    pub detail: String,
}

fn strings(value: Option<&serde_json::Value>) -> Result<Vec<(String, String)>, String> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let object = value
        .as_object()
        .ok_or("headers and context must be JSON objects")?;
    object
        .iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k.clone(), s.clone())),
            other => Ok((k.clone(), other.to_string())),
        })
        .collect()
}

/// Runs the cases in `cases_file` against the filter in `filter_file`.
pub fn run(
    filter_file: &Path,
    cases_file: &Path,
    limits: FilterLimits,
) -> Result<Vec<CaseResult>, String> {
    let source = std::fs::read_to_string(filter_file)
        .map_err(|e| format!("{}: {e}", filter_file.display()))?;
    let cases_text = std::fs::read_to_string(cases_file)
        .map_err(|e| format!("{}: {e}", cases_file.display()))?;
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&cases_text).map_err(|e| format!("{}: {e}", cases_file.display()))?;
    let set = FilterSet::empty(limits);
    let file = filter_file.display().to_string();
    set.insert("under_test", &file, source)
        .map_err(|e| e.to_string())?;
    let filter = set.get("under_test").expect("just inserted");
    let mut results = Vec::with_capacity(cases.len());
    for (index, case) in cases.iter().enumerate() {
        let name = case["name"]
            .as_str()
            .map_or_else(|| format!("case {}", index + 1), str::to_owned);
        let event = &case["event"];
        let headers = strings(event.get("headers")).map_err(|e| format!("{name}: {e}"))?;
        let payload = match event.get("payload") {
            None => Vec::new(),
            Some(serde_json::Value::String(text)) => text.clone().into_bytes(),
            Some(other) => other.to_string().into_bytes(),
        };
        let context = Context::new(
            strings(case["subscription"].get("context")).map_err(|e| format!("{name}: {e}"))?,
        );
        let view = EventView {
            key: EventView::new_key(),
            topic: event["topic"].as_str().unwrap_or("guild.1"),
            offset: event["offset"].as_u64().unwrap_or(0),
            timestamp_ms: event["timestamp"].as_u64().unwrap_or(0),
            headers: &headers,
            payload: &payload,
        };
        let id = case["subscription"]["id"].as_u64().unwrap_or(1);
        let expected = case["expect"]
            .as_bool()
            .ok_or_else(|| format!("{name}: \"expect\" must be true or false"))?;
        let (mut passed, mut detail) = match evaluate(&filter, limits, &view, id, &context) {
            Ok(verdict) if verdict == expected => (true, String::new()),
            Ok(verdict) => (false, format!("expected {expected}, got {verdict}")),
            Err(error) => (
                false,
                format!("expected {expected}, the filter failed: {error}"),
            ),
        };
        // The way the broker judges it, with the filter's `share` (if any) applied:
        // a wrong `share` declaration shows here.
        let shared_view = EventView {
            key: EventView::new_key(),
            ..view
        };
        let shared =
            SharedVerdicts::default().allows(&set, "under_test", &context, id, &shared_view);
        if passed && shared != expected {
            passed = false;
            detail = format!(
                "expected {expected}; judged alone it is, but judged as the broker shares verdicts (the filter's `share`) it is {shared}: `share.named` misses a value this case depends on"
            );
        }
        results.push(CaseResult {
            name,
            passed,
            detail,
        });
    }
    Ok(results)
}
