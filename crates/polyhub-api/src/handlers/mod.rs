//! Route handlers, one module per resource. Each handler carries its `#[utoipa::path]`
//! description, and the router registers handlers only through `utoipa_axum::routes!`, so the
//! OpenAPI document cannot miss a route.

pub(crate) mod commands;
pub(crate) mod dead_letters;
pub(crate) mod devices;
pub(crate) mod groups;
pub(crate) mod hubs;
pub(crate) mod parsers;
pub(crate) mod system;
pub(crate) mod telemetry;

use polyhub_store::{MAX_PAGE, validate_id};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

/// Page size of registry and dead-letter lists when `limit` is absent.
pub const DEFAULT_LIST_LIMIT: u32 = 100;

/// One page of a paged list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    /// The items of this page, in list order.
    pub items: Vec<T>,
    /// Pass as the next request's cursor (`after` or `before`) to continue; `null` on the last
    /// page.
    pub next: Option<String>,
}

/// An unpaged list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Items<T> {
    /// Every item.
    pub items: Vec<T>,
}

/// Checks a group, hub or device id taken from a path or query.
pub(crate) fn checked_id(kind: &'static str, id: &str) -> Result<(), ApiError> {
    validate_id(kind, id).map_err(ApiError::from)
}

/// Resolves a `limit` query parameter: `default` when absent, else `1..=MAX_PAGE`.
pub(crate) fn checked_limit(limit: Option<u32>, default: u32) -> Result<u32, ApiError> {
    match limit {
        None => Ok(default),
        Some(limit) if (1..=MAX_PAGE).contains(&limit) => Ok(limit),
        Some(limit) => Err(ApiError::InvalidRequest(format!(
            "limit {limit} is not between 1 and {MAX_PAGE}"
        ))),
    }
}

/// How many items to ask the store for so that one extra item tells whether a next page
/// exists (the store caps requests at [`MAX_PAGE`], so a full maximal page has to assume one).
pub(crate) fn fetch_size(limit: u32) -> u32 {
    limit.saturating_add(1).min(MAX_PAGE)
}

/// Cuts what the store returned for [`fetch_size`]`(limit)` down to one page and its cursor.
pub(crate) fn into_page<T>(
    mut items: Vec<T>,
    limit: u32,
    cursor_of: impl Fn(&T) -> String,
) -> Page<T> {
    let limit = limit as usize;
    let has_more = items.len() > limit || (items.len() == limit && limit == MAX_PAGE as usize);
    items.truncate(limit);
    let next = if has_more {
        items.last().map(cursor_of)
    } else {
        None
    };
    Page { items, next }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_defaults_and_bounds() {
        assert_eq!(checked_limit(None, 100).unwrap(), 100);
        assert_eq!(checked_limit(Some(1), 100).unwrap(), 1);
        assert_eq!(checked_limit(Some(MAX_PAGE), 100).unwrap(), MAX_PAGE);
        assert!(checked_limit(Some(0), 100).is_err());
        assert!(checked_limit(Some(MAX_PAGE + 1), 100).is_err());
    }

    #[test]
    fn page_cursor_only_when_more_items_exist() {
        let cursor = |n: &u32| n.to_string();
        assert_eq!(fetch_size(2), 3);
        assert_eq!(fetch_size(MAX_PAGE), MAX_PAGE);
        let page = into_page(vec![1, 2, 3], 2, cursor);
        assert_eq!(page.items, vec![1, 2]);
        assert_eq!(page.next.as_deref(), Some("2"));
        let page = into_page(vec![1, 2], 2, cursor);
        assert_eq!(page.next, None);
        let page = into_page(Vec::<u32>::new(), 2, cursor);
        assert_eq!(page.next, None);
    }
}
