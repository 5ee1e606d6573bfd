//! Human-readable output: aligned tables, `field: value` views and timestamps.
//!
//! Kept free of I/O so that the exact text can be tested.

use serde::Serialize;

/// An aligned table: a header row, then one row per item, columns separated by two spaces.
#[derive(Debug)]
pub(crate) struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; cells beyond the header count are dropped, missing cells are empty.
    pub(crate) fn push(&mut self, cells: Vec<String>) {
        let mut cells: Vec<String> = cells.into_iter().map(|cell| printable(&cell)).collect();
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in `\n`. Trailing blanks are trimmed
    /// so that the last column is not padded.
    pub(crate) fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut text = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (index, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if index > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                let pad = width.saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }
}

/// `name: value` lines with the values aligned, for one item (`show`, `add`, `status`).
pub(crate) fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(name, _)| name.chars().count() + 1)
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for (name, value) in pairs {
        let label = format!("{name}:");
        let line = format!("{label:<width$}  {}", printable(value));
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// Control characters in a value (a text payload with newlines, say) would break the table's
/// lines; they are shown escaped instead.
fn printable(cell: &str) -> String {
    if !cell.chars().any(char::is_control) {
        return cell.to_owned();
    }
    cell.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Shortens `text` to at most `max` characters, marking the cut with `…`.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(max.saturating_sub(1)).collect();
    short.push('…');
    short
}

/// The JSON name of a serde enum value (`task`, `sgframework`, `running`).
pub(crate) fn enum_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        Ok(other) => other.to_string(),
        Err(_) => "?".to_owned(),
    }
}

/// An optional value, `-` when absent.
pub(crate) fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| value.to_string())
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds:
/// `2026-11-21T10:00:00.000Z`.
pub(crate) fn timestamp(millis: i64) -> String {
    let seconds = millis.div_euclid(1000);
    let milli = millis.rem_euclid(1000);
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// An optional timestamp, `-` when absent.
pub(crate) fn timestamp_or_dash(millis: Option<i64>) -> String {
    millis.map_or_else(|| "-".to_owned(), timestamp)
}

/// Year, month and day of the proleptic Gregorian calendar for a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`: eras of 400 years, months counted from March so that
/// the leap day comes last).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_do_not_pad_the_last_one() {
        let mut table = Table::new(&["ID", "NAME", "PROTOCOL"]);
        table.push(vec!["d1".into(), "Boiler room".into(), "mqtt".into()]);
        table.push(vec!["device-22".into(), "x".into(), String::new()]);
        assert_eq!(
            table.render(),
            "ID         NAME         PROTOCOL\n\
             d1         Boiler room  mqtt\n\
             device-22  x\n"
        );
    }

    #[test]
    fn empty_tables_print_the_header_only() {
        assert_eq!(Table::new(&["ID", "NAME"]).render(), "ID  NAME\n");
    }

    #[test]
    fn control_characters_and_wide_text_do_not_break_lines() {
        let mut table = Table::new(&["SIGNAL", "VALUE"]);
        table.push(vec!["änd".into(), "two\nlines\t!".into()]);
        table.push(vec!["s".into(), "v".into(), "dropped".into()]);
        assert_eq!(
            table.render(),
            "SIGNAL  VALUE\nänd     two\\nlines\\t!\ns       v\n"
        );
    }

    #[test]
    fn field_views_align_values() {
        let text = fields(&[("id", "h1".into()), ("desired_state", "running".into())]);
        assert_eq!(text, "id:             h1\ndesired_state:  running\n");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(1_795_255_200_123), "2026-11-21T10:00:00.123Z");
        // 2024 is a leap year; the day after Feb 28 is Feb 29.
        assert_eq!(timestamp(1_709_164_800_000), "2024-02-29T00:00:00.000Z");
        assert_eq!(timestamp(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(timestamp_or_dash(None), "-");
    }

    #[test]
    fn helpers_name_enums_and_truncate() {
        assert_eq!(
            enum_name(&polyhub_store::ChannelStyle::Sgframework),
            "sgframework"
        );
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
        assert_eq!(or_dash(Some(7)), "7");
        assert_eq!(or_dash(None::<u32>), "-");
    }
}
