//! The HTTP side of the CLI: one small client of polyhub's REST API and the CLI's error type.
//!
//! Responses are returned as raw text so that `--output json` can print exactly what the API
//! said; callers parse the text themselves when they render a table.

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

/// Why a CLI command failed. `main` prints it as `error: <Display>` and exits with 1.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CtlError {
    /// The API answered with an error document (or at least an error status).
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        /// The API's stable error code (`not_found`, `conflict`, ...), or `unknown` when the
        /// body was not an error document.
        code: String,
        message: String,
    },
    /// Nothing listens at the API address: by far the most common mistake, so it gets advice.
    #[error("cannot reach the polyhub API at {url}: is `polyhub run` running?")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The request failed after connecting (timeout, connection reset, ...).
    #[error("request to {url} failed")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The API answered something this CLI does not understand (a version mismatch, or not
    /// polyhub at all).
    #[error("unexpected response from {url}: {detail}")]
    UnexpectedResponse { url: String, detail: String },
    /// `--api` is not a usable base URL.
    #[error("invalid API URL {url:?}: {reason}")]
    InvalidApiUrl { url: String, reason: String },
    /// A paged query returned the same cursor twice; following it would never end.
    #[error("the API returned the same cursor {cursor:?} twice while paging {url}")]
    CursorLoop { url: String, cursor: String },
    /// The request body could not be encoded (not expected for the CLI's own types).
    #[error("cannot encode the request body")]
    Encode(#[source] serde_json::Error),
    /// Writing the result failed (other than a closed pipe, which is not an error).
    #[error("cannot write to standard output")]
    Output(#[source] std::io::Error),
}

/// How long one request may take. Stopping a hub waits for its parser to commit, hence generous.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A successful answer: status and body text.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) url: Url,
    pub(crate) body: String,
}

impl Reply {
    /// The body as `T`; a body that does not fit is reported, never a panic.
    pub(crate) fn parse<T: DeserializeOwned>(&self) -> Result<T, CtlError> {
        serde_json::from_str(&self.body).map_err(|error| CtlError::UnexpectedResponse {
            url: self.url.to_string(),
            detail: format!("{error} (HTTP {})", self.status.as_u16()),
        })
    }
}

/// A client of one polyhub API base URL.
#[derive(Debug)]
pub(crate) struct ApiClient {
    base: Url,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client for `api` (e.g. `http://127.0.0.1:8080`, possibly with a path prefix).
    pub(crate) fn new(api: &str) -> Result<Self, CtlError> {
        let invalid = |reason: &str| CtlError::InvalidApiUrl {
            url: api.to_owned(),
            reason: reason.to_owned(),
        };
        let base = Url::parse(api).map_err(|error| invalid(&error.to_string()))?;
        // This build of reqwest carries no TLS; say so instead of failing at connect time.
        if base.scheme() != "http" {
            return Err(invalid("only http:// URLs are supported"));
        }
        if base.cannot_be_a_base() || base.host().is_none() {
            return Err(invalid("expected http://HOST:PORT"));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|error| invalid(&error.to_string()))?;
        Ok(ApiClient { base, http })
    }

    /// The URL of `segments` below the base, each segment percent-encoded (ids come from the
    /// command line and must not be able to change the path), with `query` pairs whose value
    /// is present.
    pub(crate) fn url(&self, segments: &[&str], query: &[(&str, Option<String>)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url.set_query(None);
        url.set_fragment(None);
        let present: Vec<(&str, &String)> = query
            .iter()
            .filter_map(|(name, value)| value.as_ref().map(|value| (*name, value)))
            .collect();
        if !present.is_empty() {
            url.query_pairs_mut().extend_pairs(present);
        }
        url
    }

    /// Sends one request; a non-2xx answer becomes [`CtlError::Api`].
    pub(crate) async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, CtlError> {
        self.send_with_timeout(method, url, body, REQUEST_TIMEOUT)
            .await
    }

    /// [`send`](Self::send) with its own time limit, for requests that the API holds open on
    /// purpose (a command sent with `wait_ms`).
    pub(crate) async fn send_with_timeout(
        &self,
        method: Method,
        url: Url,
        body: Option<&serde_json::Value>,
        timeout: Duration,
    ) -> Result<Reply, CtlError> {
        let mut request = self.http.request(method, url.clone()).timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|source| {
            if source.is_connect() {
                CtlError::Unreachable {
                    url: self.base.as_str().trim_end_matches('/').to_owned(),
                    source,
                }
            } else {
                CtlError::Request {
                    url: url.to_string(),
                    source,
                }
            }
        })?;
        let status = response.status();
        let body = response.text().await.map_err(|source| CtlError::Request {
            url: url.to_string(),
            source,
        })?;
        if !status.is_success() {
            return Err(api_error(status, &body));
        }
        Ok(Reply { status, url, body })
    }

    pub(crate) async fn get(
        &self,
        segments: &[&str],
        query: &[(&str, Option<String>)],
    ) -> Result<Reply, CtlError> {
        self.send(Method::GET, self.url(segments, query), None)
            .await
    }

    pub(crate) async fn post(
        &self,
        segments: &[&str],
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, CtlError> {
        self.send(Method::POST, self.url(segments, &[]), body).await
    }

    pub(crate) async fn delete(&self, segments: &[&str]) -> Result<Reply, CtlError> {
        self.send(Method::DELETE, self.url(segments, &[]), None)
            .await
    }
}

/// The API's error document: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, serde::Deserialize)]
struct ErrorDocument {
    error: ErrorBody,
}

#[derive(Debug, serde::Deserialize)]
struct ErrorBody {
    code: String,
    message: String,
}

/// Turns an error answer into [`CtlError::Api`], also when the body is not an error document
/// (a proxy's HTML page, an empty body): then the status and a short excerpt tell the story.
pub(crate) fn api_error(status: StatusCode, body: &str) -> CtlError {
    match serde_json::from_str::<ErrorDocument>(body) {
        Ok(document) => CtlError::Api {
            status: status.as_u16(),
            code: document.error.code,
            message: document.error.message,
        },
        Err(_) => {
            let excerpt: String = body.trim().chars().take(200).collect();
            let message = match (excerpt.is_empty(), status.canonical_reason()) {
                (false, _) => excerpt,
                (true, Some(reason)) => reason.to_owned(),
                (true, None) => "no error message".to_owned(),
            };
            CtlError::Api {
                status: status.as_u16(),
                code: "unknown".to_owned(),
                message,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_documents_format_as_message_code_and_status() {
        let error = api_error(
            StatusCode::NOT_FOUND,
            r#"{"error":{"code":"not_found","message":"hub \"h9\" not found"}}"#,
        );
        assert_eq!(
            error.to_string(),
            r#"hub "h9" not found (not_found, HTTP 404)"#
        );
    }

    #[test]
    fn error_bodies_that_are_not_documents_keep_status_and_excerpt() {
        let error = api_error(StatusCode::BAD_GATEWAY, "  upstream down\n");
        assert_eq!(error.to_string(), "upstream down (unknown, HTTP 502)");
        let error = api_error(StatusCode::SERVICE_UNAVAILABLE, "");
        assert_eq!(error.to_string(), "Service Unavailable (unknown, HTTP 503)");
    }

    #[test]
    fn urls_encode_segments_and_skip_absent_query_values() {
        let client = ApiClient::new("http://127.0.0.1:8080/prefix/").unwrap();
        let url = client.url(
            &["devices", "a/b?c", "telemetry"],
            &[
                ("signal", Some("temp x".to_owned())),
                ("from", None),
                ("limit", Some("5".to_owned())),
            ],
        );
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8080/prefix/devices/a%2Fb%3Fc/telemetry?signal=temp+x&limit=5"
        );
        let bare = ApiClient::new("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            bare.url(&["groups"], &[]).as_str(),
            "http://127.0.0.1:8080/groups"
        );
    }

    #[test]
    fn unusable_api_urls_are_rejected_with_the_reason() {
        for (url, reason) in [
            (
                "https://hub.example:8443",
                "only http:// URLs are supported",
            ),
            ("127.0.0.1:8080", ""),
            ("not a url", ""),
        ] {
            let error = ApiClient::new(url).unwrap_err();
            assert!(matches!(error, CtlError::InvalidApiUrl { .. }), "{url}");
            assert!(error.to_string().contains(reason), "{error}");
        }
    }
}
