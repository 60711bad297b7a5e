//! Settlement handles (`Handle::parse`, `Reservation::from_handle`) on any text a client or
//! a proxy can put in `x-llm-ratelimit-reservation`: never panics, a parsed handle
//! re-encodes to one that parses to the same value, and a handle in the form we write
//! (`<endpoint><encoding>v1.<window_ms>.<precision_ms>.<16 hex>.<name>`) re-encodes to
//! exactly itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_ratelimit::admission::Handle;
use llm_ratelimit::engine::Reservation;
use llm_ratelimit::openai::Encoding;

/// A model name for each encoding, for re-encoding (a handle carries the encoding only).
fn model_for(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::O200k => "gpt-4o",
        Encoding::Cl100k => "gpt-4",
    }
}

/// A decimal as `u64` formats it: digits only, no leading zero.
fn canonical_decimal(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
}

/// The engine part as `Reservation::handle` writes it.
fn canonical_reservation(s: &str) -> bool {
    let parts: Vec<&str> = s.splitn(5, '.').collect();
    parts.len() == 5
        && parts[0] == "v1"
        && canonical_decimal(parts[1])
        && canonical_decimal(parts[2])
        && parts[3].len() == 16
        && parts[3]
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Some(reservation) = Reservation::from_handle(text) {
        let again = reservation.handle();
        assert_eq!(
            Reservation::from_handle(&again).as_ref(),
            Some(&reservation)
        );
        if canonical_reservation(text) {
            assert_eq!(again, text);
        }
    }

    if let Some(handle) = Handle::parse(text) {
        let again = Handle::encode(
            handle.endpoint,
            model_for(handle.encoding),
            &handle.reservation,
        );
        assert_eq!(Handle::parse(&again).as_ref(), Some(&handle));
        // Both letters were read back, so they are one byte each and in canonical form.
        if canonical_reservation(&text[2..]) {
            assert_eq!(again, text);
        }
        // A parsed handle always yields a meter (feeding it is output_meter's target).
        let _meter = handle.meter();
    }
});
