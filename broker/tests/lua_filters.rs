//! The filters shipped in `lua-filters/` pass their test cases.

use std::path::Path;

use switchyard_broker::filter::{FilterLimits, cases};

fn run(name: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lua-filters");
    let results = cases::run(
        &root.join(format!("{name}.lua")),
        &root.join(format!("cases/{name}.json")),
        FilterLimits::default(),
    )
    .unwrap();
    let failed: Vec<_> = results.iter().filter(|r| !r.passed).collect();
    assert!(failed.is_empty(), "{name}: {failed:#?}");
    assert!(results.len() >= 8, "{name} has {} cases", results.len());
}

#[test]
fn channel_permissions_cases_pass() {
    run("channel_permissions");
}

#[test]
fn intents_cases_pass() {
    run("intents");
}

#[test]
fn blocked_users_cases_pass() {
    run("blocked_users");
}
