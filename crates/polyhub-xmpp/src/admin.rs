//! Removing device accounts with the server's XEP-0133 (service administration) "delete user"
//! ad-hoc command (XEP-0050), run by the hub's own logged-in account.
//!
//! An account can only cancel its own registration (XEP-0077) after logging in with its
//! password, which polyhub hands out once and does not keep; a server admin can delete any
//! account of its host. The exchange is two IQs: `execute` answers with a form and a session
//! id, the submitted form (`accountjids`) completes it.

use polyhub_polyglot::backend::BackendError;
use tokio_xmpp::jid::{BareJid, Jid};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::minidom::Element;
use tokio_xmpp::parsers::minidom::rxml::{Namespace, NcName};
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, StanzaError};

/// XEP-0050 ad-hoc commands.
const COMMANDS_NS: &str = "http://jabber.org/protocol/commands";
/// XEP-0004 data forms.
const DATA_FORMS_NS: &str = "jabber:x:data";
/// XEP-0133's form type and the node of its "delete user" command.
const ADMIN_FORM_TYPE: &str = "http://jabber.org/protocol/admin";
const DELETE_USER_NODE: &str = "http://jabber.org/protocol/admin#delete-user";

/// The first request: run the command on `host` (the account's server).
pub(crate) fn execute_request(id: &str, host: &BareJid) -> Iq {
    let command = command_element(None, "execute");
    set(id, host, command)
}

/// The second request: the form of the command session `session`, naming `account`.
pub(crate) fn submit_request(id: &str, host: &BareJid, session: &str, account: &BareJid) -> Iq {
    let mut command = command_element(Some(session), "complete");
    let mut form = Element::builder("x", DATA_FORMS_NS).build();
    set_attribute(&mut form, "type", "submit");
    form.append_child(field("FORM_TYPE", Some("hidden"), ADMIN_FORM_TYPE));
    form.append_child(field("accountjids", None, &account.to_string()));
    command.append_child(form);
    set(id, host, command)
}

/// The session id the server opened with its answer to [`execute_request`].
pub(crate) fn session_of(answer: Iq, account: &BareJid) -> Result<String, BackendError> {
    let payload = result_payload(answer, account)?;
    payload
        .filter(|command| command.is("command", COMMANDS_NS))
        .and_then(|command| command.attr("sessionid").map(str::to_owned))
        .ok_or_else(|| {
            BackendError::Unavailable(format!(
                "deleting {account}: the server's answer carries no command session"
            ))
        })
}

/// Checks the server's answer to [`submit_request`]: the command completed without a note
/// saying the account could not be deleted.
pub(crate) fn check_completed(answer: Iq, account: &BareJid) -> Result<(), BackendError> {
    let command = result_payload(answer, account)?
        .filter(|command| command.is("command", COMMANDS_NS))
        .ok_or_else(|| {
            BackendError::Unavailable(format!(
                "deleting {account}: the server's answer is not a command result"
            ))
        })?;
    if command.attr("status") != Some("completed") {
        return Err(BackendError::Unavailable(format!(
            "deleting {account}: the command did not complete (status {:?})",
            command.attr("status").unwrap_or("none")
        )));
    }
    for note in command
        .children()
        .filter(|child| child.is("note", COMMANDS_NS))
    {
        let text = note.text();
        // Prosody reports accounts it could not delete (no such account) in an info note.
        if note.attr("type") == Some("error") || text.contains("could not be deleted") {
            return Err(BackendError::Rejected(format!(
                "the server did not delete {account}: {}",
                text.trim()
            )));
        }
    }
    Ok(())
}

fn command_element(session: Option<&str>, action: &str) -> Element {
    let mut command = Element::builder("command", COMMANDS_NS).build();
    set_attribute(&mut command, "node", DELETE_USER_NODE);
    set_attribute(&mut command, "action", action);
    if let Some(session) = session {
        set_attribute(&mut command, "sessionid", session);
    }
    command
}

/// Sets an attribute without a namespace; `name` is one of this module's literals.
fn set_attribute(element: &mut Element, name: &'static str, value: &str) {
    let name = NcName::try_from(name).expect("attribute names here are valid XML names");
    element.set_attr(Namespace::NONE, name, value.to_owned());
}

fn field(var: &str, kind: Option<&str>, value: &str) -> Element {
    let mut field = Element::builder("field", DATA_FORMS_NS).build();
    set_attribute(&mut field, "var", var);
    if let Some(kind) = kind {
        set_attribute(&mut field, "type", kind);
    }
    let mut value_element = Element::builder("value", DATA_FORMS_NS).build();
    value_element.append_text_node(value);
    field.append_child(value_element);
    field
}

fn set(id: &str, host: &BareJid, payload: Element) -> Iq {
    Iq::Set {
        from: None,
        to: Some(Jid::from(host.clone())),
        id: id.to_owned(),
        payload,
    }
}

/// The payload of a result, or the error an error answer stands for.
fn result_payload(answer: Iq, account: &BareJid) -> Result<Option<Element>, BackendError> {
    match answer {
        Iq::Result { payload, .. } => Ok(payload),
        Iq::Error { error, .. } => Err(refusal(&error, account)),
        Iq::Get { .. } | Iq::Set { .. } => Err(BackendError::Unavailable(format!(
            "deleting {account}: the server answered with a request"
        ))),
    }
}

fn refusal(error: &StanzaError, account: &BareJid) -> BackendError {
    match error.defined_condition {
        DefinedCondition::Forbidden | DefinedCondition::NotAuthorized => {
            BackendError::Rejected(format!(
                "the hub's XMPP account may not delete {account}: make it an admin of the server \
                 (Prosody: `admins` and the `admin_adhoc` module)"
            ))
        }
        DefinedCondition::ItemNotFound
        | DefinedCondition::ServiceUnavailable
        | DefinedCondition::FeatureNotImplemented => BackendError::Unsupported(format!(
            "the XMPP server offers no XEP-0133 delete-user command, so {account} cannot be \
             removed by polyhub: delete the account on the server"
        )),
        ref other => BackendError::Unavailable(format!(
            "the XMPP server refused to delete {account}: {other:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jid(text: &str) -> BareJid {
        text.parse().expect("a bare JID")
    }

    #[test]
    fn the_submitted_form_names_the_account() {
        let iq = submit_request("r2", &jid("localhost"), "s-1", &jid("dev1@localhost"));
        let Iq::Set { to, payload, .. } = iq else {
            panic!("a set");
        };
        assert_eq!(to, Some(Jid::from(jid("localhost"))));
        assert_eq!(payload.attr("node"), Some(DELETE_USER_NODE));
        assert_eq!(payload.attr("sessionid"), Some("s-1"));
        assert_eq!(payload.attr("action"), Some("complete"));
        let form = payload.get_child("x", DATA_FORMS_NS).expect("a form");
        let values: Vec<(Option<&str>, String)> = form
            .children()
            .map(|field| {
                let value = field.get_child("value", DATA_FORMS_NS).map(Element::text);
                (field.attr("var"), value.unwrap_or_default())
            })
            .collect();
        assert_eq!(
            values,
            [
                (Some("FORM_TYPE"), ADMIN_FORM_TYPE.to_owned()),
                (Some("accountjids"), "dev1@localhost".to_owned())
            ]
        );
    }

    fn result(payload: &str) -> Iq {
        Iq::Result {
            from: None,
            to: None,
            id: "r".into(),
            payload: Some(payload.parse().expect("XML")),
        }
    }

    #[test]
    fn answers_are_read_for_the_session_and_the_outcome() {
        let account = jid("dev1@localhost");
        let opened = result(
            "<command xmlns='http://jabber.org/protocol/commands' sessionid='abc' status='executing'/>",
        );
        assert_eq!(session_of(opened, &account).expect("a session"), "abc");
        assert!(session_of(result("<other xmlns='x'/>"), &account).is_err());

        let done = result(
            "<command xmlns='http://jabber.org/protocol/commands' status='completed'>\
             <note type='info'>The following accounts were successfully deleted:\ndev1@localhost</note></command>",
        );
        assert!(check_completed(done, &account).is_ok());
        let missing = result(
            "<command xmlns='http://jabber.org/protocol/commands' status='completed'>\
             <note type='info'>The following accounts could not be deleted:\ndev1@localhost</note></command>",
        );
        assert!(matches!(
            check_completed(missing, &account),
            Err(BackendError::Rejected(_))
        ));
        let forbidden = Iq::Error {
            from: None,
            to: None,
            id: "r".into(),
            error: StanzaError::new(
                tokio_xmpp::parsers::stanza_error::ErrorType::Auth,
                DefinedCondition::Forbidden,
                "en",
                "no",
            ),
            payload: None,
        };
        assert!(matches!(
            session_of(forbidden, &account),
            Err(BackendError::Rejected(message)) if message.contains("admin")
        ));
    }
}
