//! What the mock "generates": how many completion tokens a request gets, and text that is
//! exactly that many tokens long in the model's encoding.
//!
//! The figure must be reproducible from the request alone, so a test (or the limiter's
//! `--verify`) can predict it, and the text must count to the same figure, so a limiter that
//! counts a stream's text (no usage chunk) settles the same number as one that reads `usage`.

/// The output budget when a request names none (no `max_completion_tokens`, `max_tokens`
/// or `max_output_tokens`).
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 64;

/// The text every reply is a prefix of, one token per word in both o200k_base and
/// cl100k_base, and no merges across words (each word but the first starts with a space, so
/// the tokenizers' pre-split keeps words apart). 64 words: enough for any reply, since
/// [`Reply::for_request`] never asks for more than 63.
const TEXT: &str = concat!(
    "This is a mock reply from the server",
    " and it is only a test of limits",
    " This is a mock reply from the server",
    " and it is only a test of limits",
    " This is a mock reply from the server",
    " and it is only a test of limits",
    " This is a mock reply from the server",
    " and it is only a test of limits",
);

/// The words [`TEXT`] holds.
const MAX_WORDS: u64 = 64;

/// The longest natural reply ([`Reply::for_request`]) and the default budget fit in [`TEXT`].
const _: () = assert!(16 + 47 <= MAX_WORDS && DEFAULT_MAX_OUTPUT_TOKENS <= MAX_WORDS);

/// One request's reply: its token figures and its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The request's budget cut the reply short (`finish_reason: "length"`; Responses:
    /// `status: "incomplete"`).
    pub truncated: bool,
}

impl Reply {
    /// The rule: a reply would naturally be `16 + prompt_tokens % 48` tokens (16..=63,
    /// varying with the prompt so a load test sees different sizes), and is cut to the
    /// request's budget `max` (default [`DEFAULT_MAX_OUTPUT_TOKENS`]). So
    /// `completion_tokens = min(max, 16 + prompt_tokens % 48)`: deterministic, never above
    /// the budget, 0 when the budget is 0.
    pub fn for_request(prompt_tokens: u64, max: Option<u64>) -> Reply {
        Reply::for_choice(prompt_tokens, max, 0)
    }

    /// Generation `g` (0-based) of a request that asks for several (chat's `n`,
    /// completions' `best_of` and prompt lists): the same rule with the prompt shifted by
    /// `g`, `min(max, 16 + (prompt_tokens + g) % 48)`, so the choices of one request differ
    /// in length. Generation 0 is [`Reply::for_request`].
    pub fn for_choice(prompt_tokens: u64, max: Option<u64>, g: u64) -> Reply {
        let natural = 16 + prompt_tokens.wrapping_add(g) % 48;
        let max = max.unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS);
        Reply {
            prompt_tokens,
            completion_tokens: natural.min(max),
            truncated: max < natural,
        }
    }

    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// OpenAI's `finish_reason` for chat and completions.
    pub fn finish_reason(&self) -> &'static str {
        if self.truncated {
            "length"
        } else {
            "stop"
        }
    }

    /// The whole text: exactly `completion_tokens` tokens.
    pub fn text(&self) -> &'static str {
        &TEXT[..Reply::word_end(self.completion_tokens)]
    }

    /// The text one token (one word) at a time, as a stream sends it; the pieces
    /// concatenate to [`Reply::text`].
    pub fn pieces(&self) -> impl Iterator<Item = &'static str> {
        let mut rest = self.text();
        std::iter::from_fn(move || {
            // Every word but the first opens with a space: a piece runs to the next space.
            let end = rest.get(1..)?.find(' ').map_or(rest.len(), |i| i + 1);
            let (piece, tail) = rest.split_at(end);
            rest = tail;
            Some(piece)
        })
    }

    /// Byte offset where word `n` ends (0 for none): just before the space that opens word
    /// `n + 1`.
    fn word_end(n: u64) -> usize {
        if n == 0 {
            return 0;
        }
        TEXT.match_indices(' ')
            .nth(n as usize - 1)
            .map_or(TEXT.len(), |(i, _)| i)
    }
}

/// The streamed pieces of several choices, interleaved as an upstream streams `n` choices:
/// round by round, each choice's next piece with its index, until every choice is done.
pub(crate) fn interleaved(choices: &[Reply]) -> impl Iterator<Item = (u32, &'static str)> {
    let mut pieces: Vec<_> = choices.iter().map(Reply::pieces).collect();
    let mut round: Vec<(u32, &'static str)> = Vec::new();
    std::iter::from_fn(move || {
        if round.is_empty() {
            round = pieces
                .iter_mut()
                .zip(0..)
                .filter_map(|(rest, index)| rest.next().map(|piece| (index, piece)))
                .collect();
            round.reverse();
        }
        round.pop()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::Tokenizer;

    #[test]
    fn text_has_the_advertised_number_of_words() {
        assert_eq!(TEXT.split(' ').count() as u64, MAX_WORDS);
        assert!(!TEXT.contains("  "));
    }

    #[test]
    fn every_prefix_counts_one_token_per_word_in_both_encodings() {
        let tokenizer = Tokenizer::new();
        for model in ["gpt-4o", "gpt-4"] {
            for n in 0..=MAX_WORDS {
                let reply = Reply {
                    prompt_tokens: 0,
                    completion_tokens: n,
                    truncated: false,
                };
                assert_eq!(tokenizer.count_text(model, reply.text()), n, "{model} {n}");
                assert_eq!(reply.pieces().count() as u64, n);
                assert_eq!(reply.pieces().collect::<String>(), reply.text());
            }
        }
    }

    #[test]
    fn completion_tokens_follow_the_rule_and_never_exceed_the_budget() {
        for prompt in 0..200 {
            for max in [
                None,
                Some(0),
                Some(1),
                Some(16),
                Some(40),
                Some(63),
                Some(1000),
            ] {
                let reply = Reply::for_request(prompt, max);
                let budget = max.unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS);
                assert!(reply.completion_tokens <= budget);
                assert!(reply.completion_tokens <= MAX_WORDS);
                assert_eq!(
                    reply.completion_tokens,
                    (16 + prompt % 48).min(budget),
                    "{prompt} {max:?}"
                );
                assert_eq!(reply.truncated, budget < 16 + prompt % 48);
                assert_eq!(reply.total_tokens(), prompt + reply.completion_tokens);
            }
        }
        assert_eq!(Reply::for_request(5, Some(0)).text(), "");
        assert_eq!(Reply::for_request(5, Some(3)).text(), "This is a");
        assert_eq!(Reply::for_request(5, Some(3)).finish_reason(), "length");
        assert_eq!(Reply::for_request(5, None).finish_reason(), "stop");
    }

    #[test]
    fn generation_g_shifts_the_prompt_by_g() {
        for prompt in [0, 5, 47, 1000, u64::MAX] {
            assert_eq!(
                Reply::for_choice(prompt, Some(40), 0),
                Reply::for_request(prompt, Some(40))
            );
            for g in 1..100 {
                let reply = Reply::for_choice(prompt, Some(40), g);
                let natural = 16 + prompt.wrapping_add(g) % 48;
                assert_eq!(reply.completion_tokens, natural.min(40), "{prompt} {g}");
                assert!(reply.completion_tokens <= MAX_WORDS);
            }
        }
    }
}
