//! Topic names and filters: validation, wildcard matching and shared subscriptions (MQTT 3.1.1
//! §4.7, MQTT 5.0 §4.7 and §4.8.2).
//!
//! A topic is a `/`-separated list of levels; a level may be empty (`/finance` has two levels, the
//! first empty). Filters add two wildcards, each alone in its level: `+` matches exactly one level
//! (an empty one too) and `#`, only as the last level, matches any number of levels including
//! none, so `sport/#` also matches `sport`. Topics whose first level starts with `$` (`$SYS/...`)
//! are reserved for the server: a filter starting with a wildcard does not match them.
//!
//! Shared subscriptions are filters of the form `$share/<group>/<filter>`; the broker hands each
//! matching message to one member of the group. Like Mosquitto, we treat any filter whose first
//! level is exactly `$share` as an attempt at one, so `$share` and `$share/group` are invalid
//! rather than plain filters nobody could ever publish to.

/// Longest topic name or filter: the length prefix of an MQTT UTF-8 string is 16 bits.
const MAX_TOPIC_LEN: usize = 65_535;

/// First level of a shared subscription filter.
const SHARE_PREFIX: &str = "$share";

/// Why a topic name or filter is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Empty topic.
    #[error("topic is empty")]
    Empty,
    /// A topic name contains `+` or `#`.
    #[error("topic name contains a wildcard")]
    WildcardInName,
    /// `#` not last or not alone in its level, or `+` not alone in its level.
    #[error("misplaced wildcard in topic filter")]
    MisplacedWildcard,
    /// Contains U+0000.
    #[error("topic contains a NUL character")]
    NulCharacter,
    /// Longer than 65,535 bytes.
    #[error("topic longer than 65535 bytes")]
    TooLong,
    /// `$share/` filter without a valid group name and filter.
    #[error("invalid shared subscription")]
    InvalidShare,
}

/// Check a topic name as used in PUBLISH: at least one byte, at most 65,535, no NUL and no
/// wildcard characters (§4.7.3, §1.5.4).
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    check_length_and_nul(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Check a topic filter as used in SUBSCRIBE and UNSUBSCRIBE. A `$share/<group>/<filter>` form
/// is accepted when the group and the inner filter are valid (see [`parse_shared`]).
pub fn validate_topic_filter(filter: &str) -> Result<(), TopicError> {
    check_length_and_nul(filter)?;
    let plain = match parse_shared(filter)? {
        Some((_, inner)) => inner,
        None => filter,
    };
    let mut levels = plain.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        let wildcard_ok = match level {
            "#" => is_last,
            "+" => true,
            _ => !level.contains(['+', '#']),
        };
        if !wildcard_ok {
            return Err(TopicError::MisplacedWildcard);
        }
    }
    Ok(())
}

/// Split `$share/<group>/<filter>` into its group and filter; `Ok(None)` for a plain filter.
///
/// The group must be at least one character and contain none of `/`, `+`, `#`; the filter must be
/// non-empty (§4.8.2). Only the shape is checked here: [`validate_topic_filter`] also checks the
/// wildcards of the inner filter.
pub fn parse_shared(filter: &str) -> Result<Option<(&str, &str)>, TopicError> {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        return Ok(None);
    };
    // `$shared/x` or `$sharefoo` are plain filters: only a first level of exactly `$share` counts.
    let rest = match rest.strip_prefix('/') {
        Some(rest) => rest,
        None if rest.is_empty() => return Err(TopicError::InvalidShare),
        None => return Ok(None),
    };
    let Some((group, inner)) = rest.split_once('/') else {
        return Err(TopicError::InvalidShare);
    };
    if group.is_empty() || group.contains(['+', '#']) || inner.is_empty() {
        return Err(TopicError::InvalidShare);
    }
    Ok(Some((group, inner)))
}

/// Whether `topic` (a valid topic name) matches `filter` (a valid plain filter, without any
/// `$share/<group>/` prefix). A topic whose first level starts with `$` is not matched by a
/// filter whose first level is a wildcard (§4.7.2).
///
/// Never panics; for an invalid filter the answer is unspecified.
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    if topic.starts_with('$') {
        let first_filter_level = filter.split('/').next();
        if matches!(first_filter_level, Some("+" | "#")) {
            return false;
        }
    }
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            // `#` covers the rest, including no level at all (`sport/#` matches `sport`).
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn check_length_and_nul(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    if topic.contains('\0') {
        return Err(TopicError::NulCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn multi_level_wildcard_spec_examples() {
        // MQTT 3.1.1 / 5.0 §4.7.1.2.
        for topic in [
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/tennis/player1/score/wimbledon",
        ] {
            assert!(matches("sport/tennis/player1/#", topic), "{topic}");
        }
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/tennis/#", "sport/tennis"));
        assert!(matches("sport/tennis/#", "sport/tennis/"));
        assert!(!matches("sport/tennis/#", "sport"));
        assert!(!matches("sport/tennis/#", "sport/tennisball"));
        assert!(!matches("sport/#", "sports"));
        assert!(matches("#", "sport/tennis"));
        assert!(matches("#", "/"));
        assert!(matches("#", "a"));

        assert_eq!(validate_topic_filter("#"), Ok(()));
        assert_eq!(validate_topic_filter("sport/tennis/#"), Ok(()));
        assert_eq!(
            validate_topic_filter("sport/tennis#"),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(
            validate_topic_filter("sport/tennis/#/ranking"),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(
            validate_topic_filter("#/"),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(
            validate_topic_filter("##"),
            Err(TopicError::MisplacedWildcard)
        );
    }

    #[test]
    fn single_level_wildcard_spec_examples() {
        // MQTT 3.1.1 / 5.0 §4.7.1.3.
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(matches("sport/tennis/+", "sport/tennis/player2"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("+", "finance"));
        assert!(matches("sport/+/player1", "sport/tennis/player1"));
        assert!(matches("+/tennis/#", "sport/tennis"));
        assert!(matches("+/+/+", "//"));
        assert!(!matches("+/+", "//"));

        assert_eq!(validate_topic_filter("+"), Ok(()));
        assert_eq!(validate_topic_filter("+/tennis/#"), Ok(()));
        assert_eq!(validate_topic_filter("sport/+/player1"), Ok(()));
        assert_eq!(validate_topic_filter("+/+"), Ok(()));
        assert_eq!(validate_topic_filter("/+"), Ok(()));
        assert_eq!(
            validate_topic_filter("sport+"),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(
            validate_topic_filter("sport/+player/x"),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(
            validate_topic_filter("++"),
            Err(TopicError::MisplacedWildcard)
        );
    }

    #[test]
    fn dollar_topics_are_not_matched_by_a_leading_wildcard() {
        // MQTT 3.1.1 / 5.0 §4.7.2.
        assert!(!matches("#", "$SYS/broker/uptime"));
        assert!(!matches("#", "$SYS"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(!matches("+", "$SYS"));
        assert!(!matches("+/#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/+/Clients", "$SYS/monitor/Clients"));
        // Only the first level is special.
        assert!(matches("a/+", "a/$b"));
        assert!(matches("a/#", "a/$b/c"));
        assert!(matches("+/$b", "a/$b"));
        // A `$` later in the first level does not make a topic special.
        assert!(matches("#", "a$b/c"));
    }

    #[test]
    fn topic_semantics_spec_examples() {
        // MQTT 3.1.1 / 5.0 §4.7.3: case-sensitive, spaces allowed, a leading `/` is a level.
        assert!(!matches("ACCOUNTS", "Accounts"));
        assert!(matches("Accounts payable", "Accounts payable"));
        assert!(!matches("finance", "/finance"));
        assert!(!matches("/finance", "finance"));
        assert!(matches("/", "/"));
        assert!(!matches("a/b", "a/b/"));
        assert!(!matches("a/b/", "a/b"));
        assert!(!matches("a/b", "a"));
        assert!(!matches("a", "a/b"));

        assert_eq!(validate_topic_name("Accounts payable"), Ok(()));
        assert_eq!(validate_topic_name("/"), Ok(()));
        assert_eq!(validate_topic_name("//"), Ok(()));
        assert_eq!(validate_topic_name("$SYS/broker"), Ok(()));
        assert_eq!(validate_topic_filter("/"), Ok(()));
    }

    #[test]
    fn topic_names_reject_wildcards_nul_empty_and_oversize() {
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
        assert_eq!(validate_topic_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_topic_name("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_topic_name("a+b"), Err(TopicError::WildcardInName));
        assert_eq!(validate_topic_name("a\0b"), Err(TopicError::NulCharacter));
        assert_eq!(validate_topic_filter(""), Err(TopicError::Empty));
        assert_eq!(validate_topic_filter("a/\0"), Err(TopicError::NulCharacter));

        let longest = "a".repeat(MAX_TOPIC_LEN);
        assert_eq!(validate_topic_name(&longest), Ok(()));
        assert_eq!(validate_topic_filter(&longest), Ok(()));
        let too_long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(validate_topic_name(&too_long), Err(TopicError::TooLong));
        assert_eq!(validate_topic_filter(&too_long), Err(TopicError::TooLong));
    }

    #[test]
    fn shared_subscription_filters() {
        // MQTT 5.0 §4.8.2.
        assert_eq!(parse_shared("$share/g/a/b"), Ok(Some(("g", "a/b"))));
        assert_eq!(
            parse_shared("$share/consumer1/sport/tennis/+"),
            Ok(Some(("consumer1", "sport/tennis/+")))
        );
        assert_eq!(parse_shared("$share/g/#"), Ok(Some(("g", "#"))));
        assert_eq!(parse_shared("$share/g//"), Ok(Some(("g", "/"))));
        assert_eq!(parse_shared("$share/g/$SYS/#"), Ok(Some(("g", "$SYS/#"))));
        assert_eq!(parse_shared("a/b"), Ok(None));
        assert_eq!(parse_shared("$SYS/#"), Ok(None));
        assert_eq!(parse_shared("$sharefoo/g/a"), Ok(None));
        assert_eq!(parse_shared("$shared/g/a"), Ok(None));
        assert_eq!(parse_shared("a/$share/g/b"), Ok(None));

        for invalid in [
            "$share",
            "$share/",
            "$share/g",
            "$share/g/",
            "$share//a",
            "$share/+/a",
            "$share/#/a",
            "$share/g+/a",
            "$share/g#/a",
        ] {
            assert_eq!(
                parse_shared(invalid),
                Err(TopicError::InvalidShare),
                "{invalid}"
            );
            assert_eq!(
                validate_topic_filter(invalid),
                Err(TopicError::InvalidShare),
                "{invalid}"
            );
        }

        assert_eq!(validate_topic_filter("$share/g/a/+/#"), Ok(()));
        assert_eq!(validate_topic_filter("$share/g/#"), Ok(()));
        assert_eq!(
            validate_topic_filter("$share/g/a#"),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(
            validate_topic_filter("$share/g/#/a"),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(
            validate_topic_filter("$share/g/\0"),
            Err(TopicError::NulCharacter)
        );
    }

    /// The reference matcher: the spec's rules stated over slices of levels, recursively.
    fn reference_matches(filter: &str, topic: &str) -> bool {
        fn levels_match(filter: &[&str], topic: &[&str]) -> bool {
            match (filter, topic) {
                ([], []) => true,
                (["#"], _) => true,
                (["+", filter_rest @ ..], [_, topic_rest @ ..]) => {
                    levels_match(filter_rest, topic_rest)
                }
                ([f, filter_rest @ ..], [t, topic_rest @ ..]) => {
                    f == t && levels_match(filter_rest, topic_rest)
                }
                _ => false,
            }
        }
        let filter: Vec<&str> = filter.split('/').collect();
        let topic: Vec<&str> = topic.split('/').collect();
        let reserved = topic[0].starts_with('$');
        if reserved && (filter[0] == "+" || filter[0] == "#") {
            return false;
        }
        levels_match(&filter, &topic)
    }

    fn topic_level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("$SYS".to_owned()),
            Just("$".to_owned()),
            "[a-c$ ]{1,3}",
        ]
    }

    fn topic_name() -> impl Strategy<Value = String> {
        prop::collection::vec(topic_level(), 1..6)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("a topic is at least one character", |topic| {
                !topic.is_empty()
            })
    }

    fn topic_filter() -> impl Strategy<Value = String> {
        let level = prop_oneof![3 => topic_level(), 2 => Just("+".to_owned())];
        (prop::collection::vec(level, 0..6), any::<bool>()).prop_filter_map(
            "a filter is at least one character",
            |(mut levels, multi)| {
                if multi {
                    levels.push("#".to_owned());
                }
                let filter = levels.join("/");
                (!filter.is_empty()).then_some(filter)
            },
        )
    }

    proptest! {
        #[test]
        fn matches_agrees_with_the_reference(filter in topic_filter(), topic in topic_name()) {
            prop_assert_eq!(validate_topic_filter(&filter), Ok(()));
            prop_assert_eq!(validate_topic_name(&topic), Ok(()));
            prop_assert_eq!(matches(&filter, &topic), reference_matches(&filter, &topic));
        }

        #[test]
        fn filters_derived_from_a_topic_match_it(
            topic in topic_name(),
            wildcard_levels in prop::collection::vec(any::<bool>(), 6),
            cut in prop::option::of(0usize..6),
        ) {
            // Replace some levels by `+` and maybe cut the tail with `#`: always a match, except
            // that a wildcard first level does not match a `$` topic.
            let levels: Vec<&str> = topic.split('/').collect();
            let mut filter_levels: Vec<&str> = levels
                .iter()
                .zip(&wildcard_levels)
                .map(|(level, wild)| if *wild { "+" } else { level })
                .collect();
            if let Some(cut) = cut.filter(|cut| *cut <= filter_levels.len()) {
                filter_levels.truncate(cut);
                filter_levels.push("#");
            }
            let filter = filter_levels.join("/");
            let leading_wildcard = filter_levels[0] == "+" || filter_levels[0] == "#";
            let expected = !(leading_wildcard && topic.starts_with('$'));
            prop_assert_eq!(matches(&filter, &topic), expected, "{} vs {}", filter, topic);
        }

        #[test]
        fn a_topic_matches_itself_and_hash_matches_all_but_dollar_topics(topic in topic_name()) {
            prop_assert!(matches(&topic, &topic));
            prop_assert_eq!(matches("#", &topic), !topic.starts_with('$'));
        }

        #[test]
        fn filter_validation_agrees_with_the_level_rules(
            levels in prop::collection::vec("[a+#]{0,2}", 1..5)
        ) {
            let filter = levels.join("/");
            let last = levels.len() - 1;
            let valid = levels.iter().enumerate().all(|(i, level)| match level.as_str() {
                "#" => i == last,
                "+" => true,
                other => !other.contains(['+', '#']),
            });
            let expected = if filter.is_empty() {
                Err(TopicError::Empty)
            } else if valid {
                Ok(())
            } else {
                Err(TopicError::MisplacedWildcard)
            };
            prop_assert_eq!(validate_topic_filter(&filter), expected);
        }

        #[test]
        fn arbitrary_input_never_panics(filter in ".{0,12}", topic in ".{0,12}") {
            let _ = validate_topic_name(&topic);
            let _ = validate_topic_filter(&filter);
            let _ = parse_shared(&filter);
            let _ = matches(&filter, &topic);
        }
    }
}
