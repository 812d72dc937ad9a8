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

/// `channel_permissions` shares verdicts between members of the same shape on one
/// event; judged together they must get what each gets judged alone.
#[test]
fn channel_permissions_judged_together_match_judged_alone() {
    use switchyard_broker::filter::{
        Context, EventView, FilterSet, SharedVerdicts, evaluate, evaluate_many,
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lua-filters");
    let source = std::fs::read_to_string(root.join("channel_permissions.lua")).unwrap();
    let limits = FilterLimits::default();
    let set = FilterSet::empty(limits);
    set.insert("channel_permissions", "channel_permissions.lua", source)
        .unwrap();
    let filter = set.get("channel_permissions").unwrap();
    // A small deterministic generator.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let permissions = ["0", "1024", "2048", "8", "3072", "1032"];
    let contexts: Vec<Context> = (0..400)
        .map(|i| {
            let roles: Vec<String> = (20..26)
                .filter(|_| next(3) == 0)
                .map(|r| r.to_string())
                .collect();
            let role_permissions: Vec<String> = ["1", "20", "21", "22", "23", "24", "25"]
                .iter()
                .map(|id| format!("{id}:{}", permissions[next(6) as usize % 3]))
                .collect();
            let mut values = vec![
                ("guild_id".to_owned(), "1".to_owned()),
                ("user_id".to_owned(), (100 + i % 40).to_string()),
                ("roles".to_owned(), roles.join(",")),
                ("role_permissions".to_owned(), role_permissions.join(",")),
            ];
            if next(50) == 0 {
                values.push(("owner".to_owned(), "true".to_owned()));
            }
            Context::new(values)
        })
        .collect();
    let subscriptions: Vec<(u64, &Context)> = contexts
        .iter()
        .enumerate()
        .map(|(i, c)| (i as u64, c))
        .collect();
    let mut denied = 0;
    for round in 0..20 {
        let mut overwrites = Vec::new();
        for id in ["1", "20", "21", "22", "23", "24", "25", "101", "105", "110"] {
            if next(2) == 0 {
                let (allow, deny) = (next(6) as usize, next(6) as usize);
                overwrites.push(format!("{id}:{}:{}", permissions[allow], permissions[deny]));
            }
        }
        let mut headers = vec![("overwrites".to_owned(), overwrites.join(","))];
        if round % 5 != 4 {
            headers.push(("channel_id".to_owned(), "10".to_owned()));
        }
        let view = |key| EventView {
            key,
            topic: "guild.1",
            offset: round,
            timestamp_ms: 1,
            headers: &headers,
            payload: b"{}",
        };
        let mut together = Vec::new();
        evaluate_many(
            &filter,
            limits,
            &view(EventView::new_key()),
            &subscriptions,
            &mut together,
        );
        // As the server judges them: members not named by the overwrites share the
        // verdict of their context without `user_id` (the filter's `share`).
        let shared_view = view(EventView::new_key());
        let shared = SharedVerdicts::default().judge(
            &set,
            &shared_view,
            subscriptions
                .iter()
                .map(|&(id, c)| ("channel_permissions", c, id)),
        );
        for (i, verdict) in together.iter().enumerate() {
            let alone = evaluate(
                &filter,
                limits,
                &view(EventView::new_key()),
                0,
                &contexts[i],
            );
            assert_eq!(verdict, &alone, "round {round}, member {i}: {headers:?}");
            let allowed = shared[i];
            assert_eq!(
                Ok(allowed),
                alone,
                "shared, round {round}, member {i}: {headers:?}"
            );
            denied += usize::from(alone == Ok(false));
        }
    }
    assert!(denied > 100 && denied < 20 * 400 - 100, "{denied} denials");
}
