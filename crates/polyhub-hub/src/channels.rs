//! Topic templates of the hub channels: validation, rendering, and parsing topics back.
//!
//! Templates use the placeholders `{hub}` and `{device}`, each of which must fill a whole topic
//! level (so that replacing it by `+` gives a valid MQTT filter, and a received topic can be
//! matched level by level). Hub and device ids never contain `/`, `+` or `#`
//! ([`polyhub_store::validate_id`]), so rendering cannot produce a wildcard.

use serde::Deserialize;

use crate::error::HubError;

const HUB: &str = "{hub}";
const DEVICE: &str = "{device}";

/// Topic templates of the hub channels (`[hub.channels]`). `Default` is the documented set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelTemplates {
    /// Where a device publishes its telemetry. Needs `{device}`.
    pub data: String,
    /// Where a device receives commands. Needs `{device}`.
    pub command: String,
    /// Where a device answers commands (`{"id", "status", "result"?, "reason"?}` JSON); also
    /// the MQTT 5 response topic of each command. Needs `{device}`.
    pub command_reply: String,
    /// Where a hub's devices are added and removed at runtime. Needs `{hub}`.
    pub register: String,
    /// Where answers to `register` requests go. May use `{hub}`.
    pub register_reply: String,
    /// Where the hub manager takes start/stop/restart requests. No placeholders.
    pub manager: String,
    /// Where answers to `manager` requests go. No placeholders.
    pub manager_reply: String,
    /// Where a device reports its own presence, `online` or `offline` (meant to be a retained
    /// message and the device's last will). Needs `{device}`. This is how presence reaches
    /// polyhub when the broker is external and its connection events are out of sight.
    pub presence: String,
}

impl Default for ChannelTemplates {
    fn default() -> Self {
        ChannelTemplates {
            data: "/{hub}/{device}/data".to_owned(),
            command: "/{hub}/{device}/cmd".to_owned(),
            command_reply: "/{hub}/{device}/cmd_reply".to_owned(),
            register: "/{hub}/register_cmd".to_owned(),
            register_reply: "/{hub}/register_reply".to_owned(),
            manager: "/hub_manager/cmd".to_owned(),
            manager_reply: "/hub_manager/reply".to_owned(),
            presence: "/{hub}/{device}/presence".to_owned(),
        }
    }
}

/// Which placeholders a template must and may use.
struct Rule {
    name: &'static str,
    needs_hub: bool,
    needs_device: bool,
    allows_hub: bool,
    allows_device: bool,
}

/// Checks one template against its rule.
fn validate_template(template: &str, rule: &Rule) -> Result<(), HubError> {
    let fail = |reason: &str| {
        Err(HubError::Config(format!(
            "[hub.channels] {} = {template:?}: {reason}",
            rule.name
        )))
    };
    if template.is_empty() {
        return fail("must not be empty");
    }
    if template.contains(['+', '#', '\0']) {
        return fail("must not contain the wildcards '+' or '#' (or NUL)");
    }
    let mut hubs = 0;
    let mut devices = 0;
    for level in template.split('/') {
        match level {
            HUB => hubs += 1,
            DEVICE => devices += 1,
            other if other.contains(['{', '}']) => {
                return fail("placeholders must be {hub} or {device} and fill a whole topic level");
            }
            _ => {}
        }
    }
    if hubs > 1 || devices > 1 {
        return fail("uses a placeholder more than once");
    }
    if rule.needs_hub && hubs == 0 {
        return fail("needs the placeholder {hub}");
    }
    if rule.needs_device && devices == 0 {
        return fail("needs the placeholder {device}");
    }
    if !rule.allows_hub && hubs > 0 {
        return fail("must not use {hub}");
    }
    if !rule.allows_device && devices > 0 {
        return fail("must not use {device}");
    }
    Ok(())
}

fn render(template: &str, hub: &str, device: &str) -> String {
    template
        .split('/')
        .map(|level| match level {
            HUB => hub,
            DEVICE => device,
            other => other,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Matches `topic` against `template` level by level, returning the `{hub}` and `{device}`
/// levels it holds (empty levels never match a placeholder).
fn match_template<'t>(
    template: &str,
    topic: &'t str,
) -> Option<(Option<&'t str>, Option<&'t str>)> {
    let mut hub = None;
    let mut device = None;
    let mut template_levels = template.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (template_levels.next(), topic_levels.next()) {
            (None, None) => return Some((hub, device)),
            (Some(HUB), Some(level)) if !level.is_empty() => hub = Some(level),
            (Some(DEVICE), Some(level)) if !level.is_empty() => device = Some(level),
            (Some(expected), Some(level))
                if expected == level && expected != HUB && expected != DEVICE => {}
            _ => return None,
        }
    }
}

/// A data (or command reply) topic parsed back: the device and, if the template names it, the
/// hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataTopic<'t> {
    pub hub: Option<&'t str>,
    pub device: &'t str,
}

/// A topic of an sgframework-style hub parsed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SgframeworkTopic<'t> {
    /// `data/<device>/<signal>`.
    Data { device: &'t str, signal: &'t str },
    /// `resourceavailable/<device>/presence`.
    Presence { device: &'t str },
}

impl ChannelTemplates {
    /// Checks every template: placeholders fill whole levels, data/command name the device,
    /// register names the hub, no wildcards.
    pub fn validate(&self) -> Result<(), HubError> {
        let rules = [
            (
                &self.data,
                Rule {
                    name: "data",
                    needs_hub: false,
                    needs_device: true,
                    allows_hub: true,
                    allows_device: true,
                },
            ),
            (
                &self.command,
                Rule {
                    name: "command",
                    needs_hub: false,
                    needs_device: true,
                    allows_hub: true,
                    allows_device: true,
                },
            ),
            (
                &self.command_reply,
                Rule {
                    name: "command_reply",
                    needs_hub: false,
                    needs_device: true,
                    allows_hub: true,
                    allows_device: true,
                },
            ),
            (
                &self.register,
                Rule {
                    name: "register",
                    needs_hub: true,
                    needs_device: false,
                    allows_hub: true,
                    allows_device: false,
                },
            ),
            (
                &self.register_reply,
                Rule {
                    name: "register_reply",
                    needs_hub: false,
                    needs_device: false,
                    allows_hub: true,
                    allows_device: false,
                },
            ),
            (
                &self.manager,
                Rule {
                    name: "manager",
                    needs_hub: false,
                    needs_device: false,
                    allows_hub: false,
                    allows_device: false,
                },
            ),
            (
                &self.manager_reply,
                Rule {
                    name: "manager_reply",
                    needs_hub: false,
                    needs_device: false,
                    allows_hub: false,
                    allows_device: false,
                },
            ),
            (
                &self.presence,
                Rule {
                    name: "presence",
                    needs_hub: false,
                    needs_device: true,
                    allows_hub: true,
                    allows_device: true,
                },
            ),
        ];
        for (template, rule) in &rules {
            validate_template(template, rule)?;
        }
        // Replies on the command or data channel would be read back as our own commands or
        // as telemetry.
        if self.command_reply == self.command || self.command_reply == self.data {
            return Err(HubError::Config(
                "[hub.channels] command_reply must differ from command and data".into(),
            ));
        }
        // A presence report read as telemetry, a command or a reply (or the other way round)
        // would be a dead letter or a bogus command answer.
        if [&self.data, &self.command, &self.command_reply].contains(&&self.presence) {
            return Err(HubError::Config(
                "[hub.channels] presence must differ from data, command and command_reply".into(),
            ));
        }
        if self.register == self.manager {
            return Err(HubError::Config(
                "[hub.channels] register and manager must differ".into(),
            ));
        }
        Ok(())
    }

    /// The topic a device publishes telemetry on.
    pub fn data_topic(&self, hub: &str, device: &str) -> String {
        render(&self.data, hub, device)
    }

    /// The topic a device receives commands on.
    pub fn command_topic(&self, hub: &str, device: &str) -> String {
        render(&self.command, hub, device)
    }

    /// The topic a device answers commands on (and the response topic of its commands).
    pub fn command_reply_topic(&self, hub: &str, device: &str) -> String {
        render(&self.command_reply, hub, device)
    }

    /// The filter matching every device's reply channel (`/+/+/cmd_reply` by default).
    pub fn command_reply_filter(&self) -> String {
        render(&self.command_reply, "+", "+")
    }

    /// The device (and hub) whose reply channel `topic` is, if it is one.
    pub fn parse_command_reply_topic<'t>(&self, topic: &'t str) -> Option<DataTopic<'t>> {
        let (hub, device) = match_template(&self.command_reply, topic)?;
        Some(DataTopic {
            hub,
            device: device?,
        })
    }

    /// A hub's register channel.
    pub fn register_topic(&self, hub: &str) -> String {
        render(&self.register, hub, "")
    }

    /// Where answers to a hub's register requests go.
    pub fn register_reply_topic(&self, hub: &str) -> String {
        render(&self.register_reply, hub, "")
    }

    /// The filter matching every hub's register channel (`/+/register_cmd` by default).
    pub fn register_filter(&self) -> String {
        render(&self.register, "+", "")
    }

    /// The hub whose register channel `topic` is, if it is one.
    pub fn parse_register_topic<'t>(&self, topic: &'t str) -> Option<&'t str> {
        match_template(&self.register, topic).and_then(|(hub, _)| hub)
    }

    /// The topic a device reports its presence on.
    pub fn presence_topic(&self, hub: &str, device: &str) -> String {
        render(&self.presence, hub, device)
    }

    /// The filter matching every device's presence channel (`/+/+/presence` by default).
    pub fn presence_filter(&self) -> String {
        render(&self.presence, "+", "+")
    }

    /// The device (and hub) whose presence channel `topic` is, if it is one.
    pub fn parse_presence_topic<'t>(&self, topic: &'t str) -> Option<DataTopic<'t>> {
        let (hub, device) = match_template(&self.presence, topic)?;
        Some(DataTopic {
            hub,
            device: device?,
        })
    }

    /// The device (and hub) whose data channel `topic` is, if it is one.
    pub fn parse_data_topic<'t>(&self, topic: &'t str) -> Option<DataTopic<'t>> {
        let (hub, device) = match_template(&self.data, topic)?;
        Some(DataTopic {
            hub,
            device: device?,
        })
    }
}

/// Reads the payload of a presence channel message: `online` or `offline` (also `true` /
/// `false` and `1` / `0`), any case, ASCII whitespace trimmed. `None` for anything else.
pub fn parse_presence_payload(payload: &[u8]) -> Option<bool> {
    let word = payload.trim_ascii();
    let is = |expected: &str| word.eq_ignore_ascii_case(expected.as_bytes());
    if is("online") || is("true") || is("1") {
        Some(true)
    } else if is("offline") || is("false") || is("0") {
        Some(false)
    } else {
        None
    }
}

/// The filters an sgframework-style hub subscribes for one device: its data signals and its
/// presence topic.
pub fn sgframework_filters(device: &str) -> [String; 2] {
    [
        format!("data/{device}/+"),
        format!("resourceavailable/{device}/presence"),
    ]
}

/// Parses an sgframework topic (`data/<device>/<signal>` or
/// `resourceavailable/<device>/presence`).
pub fn parse_sgframework_topic(topic: &str) -> Option<SgframeworkTopic<'_>> {
    let mut levels = topic.split('/');
    let first = levels.next()?;
    let device = levels.next().filter(|level| !level.is_empty())?;
    let last = levels.next()?;
    if levels.next().is_some() {
        return None;
    }
    match first {
        "data" if !last.is_empty() => Some(SgframeworkTopic::Data {
            device,
            signal: last,
        }),
        "resourceavailable" if last == "presence" => Some(SgframeworkTopic::Presence { device }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn with(change: impl FnOnce(&mut ChannelTemplates)) -> ChannelTemplates {
        let mut templates = ChannelTemplates::default();
        change(&mut templates);
        templates
    }

    #[test]
    fn defaults_validate_and_render_the_documented_topics() {
        let templates = ChannelTemplates::default();
        templates.validate().unwrap();
        assert_eq!(templates.data_topic("h1", "d1"), "/h1/d1/data");
        assert_eq!(templates.command_topic("h1", "d1"), "/h1/d1/cmd");
        assert_eq!(
            templates.command_reply_topic("h1", "d1"),
            "/h1/d1/cmd_reply"
        );
        assert_eq!(templates.command_reply_filter(), "/+/+/cmd_reply");
        assert_eq!(templates.register_topic("h1"), "/h1/register_cmd");
        assert_eq!(templates.register_reply_topic("h1"), "/h1/register_reply");
        assert_eq!(templates.register_filter(), "/+/register_cmd");
        assert_eq!(templates.presence_topic("h1", "d1"), "/h1/d1/presence");
        assert_eq!(templates.presence_filter(), "/+/+/presence");
    }

    #[test]
    fn presence_template_needs_device_and_its_own_channel() {
        assert!(
            with(|t| t.presence = "/{hub}/presence".into())
                .validate()
                .is_err()
        );
        for taken in [
            "/{hub}/{device}/data",
            "/{hub}/{device}/cmd",
            "/{hub}/{device}/cmd_reply",
        ] {
            let error = with(|t| t.presence = taken.into()).validate().unwrap_err();
            assert!(
                error.to_string().contains("presence must differ"),
                "{error}"
            );
        }
        let templates = with(|t| t.presence = "status/{device}".into());
        templates.validate().unwrap();
        assert_eq!(templates.presence_filter(), "status/+");
        assert_eq!(
            templates.parse_presence_topic("status/d9"),
            Some(DataTopic {
                hub: None,
                device: "d9"
            })
        );
        let templates = ChannelTemplates::default();
        assert_eq!(
            templates.parse_presence_topic("/h1/d1/presence"),
            Some(DataTopic {
                hub: Some("h1"),
                device: "d1"
            })
        );
        assert_eq!(templates.parse_presence_topic("/h1/d1/data"), None);
        assert_eq!(templates.parse_presence_topic("/h1//presence"), None);
    }

    #[test]
    fn presence_payloads_are_online_or_offline_words() {
        for online in [&b"online"[..], b"ONLINE", b" online\n", b"true", b"1"] {
            assert_eq!(parse_presence_payload(online), Some(true), "{online:?}");
        }
        for offline in [&b"offline"[..], b"Offline", b"false", b"0"] {
            assert_eq!(parse_presence_payload(offline), Some(false), "{offline:?}");
        }
        for other in [&b""[..], b"on", b"onlinex", b"{\"online\":true}", b"\xff"] {
            assert_eq!(parse_presence_payload(other), None, "{other:?}");
        }
    }

    #[test]
    fn data_template_without_device_is_rejected() {
        assert!(with(|t| t.data = "/{hub}/data".into()).validate().is_err());
        assert!(
            with(|t| t.command = "/{hub}/cmd".into())
                .validate()
                .is_err()
        );
    }

    #[test]
    fn command_reply_needs_device_and_its_own_channel() {
        assert!(
            with(|t| t.command_reply = "/{hub}/cmd_reply".into())
                .validate()
                .is_err()
        );
        assert!(
            with(|t| t.command_reply = "/{hub}/+/cmd_reply".into())
                .validate()
                .is_err()
        );
        assert!(
            with(|t| t.command_reply = "/{hub}/{device}/cmd".into())
                .validate()
                .is_err()
        );
        assert!(
            with(|t| t.command_reply = "/{hub}/{device}/data".into())
                .validate()
                .is_err()
        );
        let templates = with(|t| t.command_reply = "replies/{device}".into());
        templates.validate().unwrap();
        assert_eq!(templates.command_reply_filter(), "replies/+");
        assert_eq!(
            templates.parse_command_reply_topic("replies/d9"),
            Some(DataTopic {
                hub: None,
                device: "d9"
            })
        );
    }

    #[test]
    fn wildcards_and_partial_placeholders_are_rejected() {
        assert!(
            with(|t| t.data = "/+/{device}/data".into())
                .validate()
                .is_err()
        );
        assert!(
            with(|t| t.data = "/{hub}/{device}/#".into())
                .validate()
                .is_err()
        );
        assert!(
            with(|t| t.data = "/x{hub}/{device}".into())
                .validate()
                .is_err()
        );
        assert!(
            with(|t| t.data = "/{hubx}/{device}".into())
                .validate()
                .is_err()
        );
        assert!(
            with(|t| t.data = "/{device}/{device}".into())
                .validate()
                .is_err()
        );
        assert!(
            with(|t| t.register = "/register_cmd".into())
                .validate()
                .is_err()
        );
        assert!(
            with(|t| t.manager = "/{hub}/mgr".into())
                .validate()
                .is_err()
        );
        assert!(with(|t| t.data = String::new()).validate().is_err());
    }

    #[test]
    fn data_topic_without_hub_level_parses_the_device() {
        let templates = with(|t| t.data = "devices/{device}/telemetry".into());
        templates.validate().unwrap();
        assert_eq!(
            templates.parse_data_topic("devices/d9/telemetry"),
            Some(DataTopic {
                hub: None,
                device: "d9"
            })
        );
    }

    #[test]
    fn foreign_topics_do_not_parse() {
        let templates = ChannelTemplates::default();
        assert_eq!(templates.parse_data_topic("/h1/d1/cmd"), None);
        assert_eq!(templates.parse_data_topic("/h1/d1/data/x"), None);
        assert_eq!(templates.parse_data_topic("//d1/data"), None);
        assert_eq!(templates.parse_data_topic("/h1/register_cmd"), None);
        assert_eq!(
            templates.parse_register_topic("/h1/register_cmd"),
            Some("h1")
        );
        assert_eq!(templates.parse_register_topic("/h1/d1/data"), None);
        assert_eq!(templates.parse_command_reply_topic("/h1/d1/cmd"), None);
        assert_eq!(templates.parse_command_reply_topic("/h1//cmd_reply"), None);
        assert_eq!(
            templates.parse_command_reply_topic("/h1/d1/cmd_reply"),
            Some(DataTopic {
                hub: Some("h1"),
                device: "d1"
            })
        );
    }

    #[test]
    fn sgframework_topics_parse() {
        assert_eq!(
            parse_sgframework_topic("data/pump/temperature"),
            Some(SgframeworkTopic::Data {
                device: "pump",
                signal: "temperature"
            })
        );
        assert_eq!(
            parse_sgframework_topic("resourceavailable/pump/presence"),
            Some(SgframeworkTopic::Presence { device: "pump" })
        );
        assert_eq!(parse_sgframework_topic("data/pump"), None);
        assert_eq!(parse_sgframework_topic("data/pump/a/b"), None);
        assert_eq!(
            parse_sgframework_topic("resourceavailable/pump/other"),
            None
        );
        assert_eq!(
            sgframework_filters("pump"),
            [
                "data/pump/+".to_owned(),
                "resourceavailable/pump/presence".to_owned()
            ]
        );
    }

    proptest! {
        #[test]
        fn rendered_data_topics_parse_back(hub in "[A-Za-z0-9_.-]{1,20}", device in "[A-Za-z0-9_.-]{1,20}") {
            let templates = ChannelTemplates::default();
            let topic = templates.data_topic(&hub, &device);
            prop_assert_eq!(
                templates.parse_data_topic(&topic),
                Some(DataTopic { hub: Some(hub.as_str()), device: device.as_str() })
            );
            let reply = templates.command_reply_topic(&hub, &device);
            prop_assert_eq!(
                templates.parse_command_reply_topic(&reply),
                Some(DataTopic { hub: Some(hub.as_str()), device: device.as_str() })
            );
            let register = templates.register_topic(&hub);
            prop_assert_eq!(templates.parse_register_topic(&register), Some(hub.as_str()));
        }

        #[test]
        fn parsing_arbitrary_topics_never_panics(topic in ".{0,80}") {
            let templates = ChannelTemplates::default();
            let _ = templates.parse_data_topic(&topic);
            let _ = templates.parse_register_topic(&topic);
            let _ = templates.parse_command_reply_topic(&topic);
            let _ = templates.parse_presence_topic(&topic);
            let _ = parse_sgframework_topic(&topic);
        }

        #[test]
        fn validating_arbitrary_templates_never_panics(template in "[/{}a-z+#]{0,30}") {
            let _ = with(|t| t.data = template.clone()).validate();
        }
    }
}
