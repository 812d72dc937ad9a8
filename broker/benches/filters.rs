//! One event fanned out to 10,000 filtered subscriptions, through the path the
//! server takes (`SharedVerdicts::judge` over
//! `lua-filters/channel_permissions.lua`):
//! (a) 10,000 distinct contexts (every member has a `user_id`, so member overwrites
//! can apply; the filter's `share` lets members its overwrites do not name share
//! one verdict per role set), (b) 20 distinct role sets (contexts without `user_id`
//! are equal, so shared), and (a) again with the filter's `share` declaration taken
//! out (`unshared`: each of the 10,000 contexts judged on its own).
//!
//! `cargo bench -p switchyard-broker --bench filters` — time per iteration is for
//! 10,000 subscriptions; divide by 10,000 for ns per subscription.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchyard_broker::filter::{Context, EventView, FilterLimits, FilterSet, SharedVerdicts};

const SUBSCRIPTIONS: usize = 10_000;

fn contexts(distinct_members: bool) -> Vec<Context> {
    let role_permissions = "1:0,20:1024,21:2048,22:1024,23:8,24:0";
    (0..SUBSCRIPTIONS)
        .map(|i| {
            let roles = match i % 20 {
                0 => "23".to_owned(),
                n => format!("{},{}", 20 + n % 3, 24 + n / 3),
            };
            let mut values = vec![
                ("guild_id".to_owned(), "1".to_owned()),
                ("roles".to_owned(), roles),
                ("role_permissions".to_owned(), role_permissions.to_owned()),
            ];
            if distinct_members {
                values.push(("user_id".to_owned(), (1000 + i).to_string()));
            }
            Context::new(values)
        })
        .collect()
}

fn fan_out(c: &mut Criterion) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../lua-filters");
    let source = std::fs::read_to_string(root.join("channel_permissions.lua")).unwrap();
    // The same filter without its `share` declaration: every distinct context is
    // judged on its own.
    let share = r#"return { filter = filter, share = { field = "user_id", named = named } }"#;
    assert!(source.contains(share));
    let unshared = source.replace(share, "return filter");
    let filters = FilterSet::empty(FilterLimits::default());
    filters
        .insert("channel_permissions", "channel_permissions.lua", source)
        .unwrap();
    filters
        .insert("unshared", "channel_permissions_unshared.lua", unshared)
        .unwrap();
    let headers = vec![
        ("type".to_owned(), "MESSAGE_CREATE".to_owned()),
        ("channel_id".to_owned(), "10".to_owned()),
        (
            "overwrites".to_owned(),
            "1:0:1024,21:1024:0,1005:0:1024".to_owned(),
        ),
    ];
    let payload = br#"{"content":"hello","author":{"id":"7"}}"#;
    let mut group = c.benchmark_group("filter_fan_out");
    group.throughput(Throughput::Elements(SUBSCRIPTIONS as u64));
    for (filter, name, distinct) in [
        ("channel_permissions", "10000_distinct_contexts", true),
        ("channel_permissions", "20_role_sets", false),
        ("unshared", "10000_distinct_contexts", true),
    ] {
        let contexts = contexts(distinct);
        group.bench_function(BenchmarkId::new(filter, name), |b| {
            b.iter(|| {
                let event = EventView {
                    key: EventView::new_key(),
                    topic: "guild.1",
                    offset: 1,
                    timestamp_ms: 1,
                    headers: &headers,
                    payload,
                };
                let mut verdicts = SharedVerdicts::default();
                let delivered = verdicts
                    .judge(
                        &filters,
                        &event,
                        contexts
                            .iter()
                            .enumerate()
                            .map(|(id, context)| (filter, context, id as u64)),
                    )
                    .into_iter()
                    .filter(|&allowed| allowed)
                    .count();
                assert!(delivered > 0 && delivered < SUBSCRIPTIONS);
                delivered
            })
        });
    }
    group.finish();
}

criterion_group!(benches, fan_out);
criterion_main!(benches);
