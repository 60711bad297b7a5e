//! The BPE encoders and which one a model uses.
//!
//! Building an encoder parses ~200k merge ranks (~200 ms), so a [`Tokenizer`] builds both
//! once at start-up and is then shared (`Arc<Tokenizer>`) by every request.

use std::fmt;

use tiktoken_rs::CoreBPE;

/// The two encodings current OpenAI models use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// gpt-4o, gpt-4.1, o-series, gpt-5 and every model we do not recognise.
    O200k,
    /// gpt-4 (not 4o/4.1), gpt-4-turbo, gpt-3.5, the embedding models.
    Cl100k,
}

impl Encoding {
    /// The encoding for a model name. A fine-tune (`ft:gpt-4o-mini:org::id`) uses its base
    /// model's; a provider prefix (`openai/gpt-4`) is ignored. Unknown models get o200k,
    /// the encoding of every model OpenAI has released since gpt-4o.
    pub fn for_model(model: &str) -> Encoding {
        let model = match model.strip_prefix("ft:") {
            Some(rest) => rest.split(':').next().unwrap_or_default(),
            None => model,
        };
        let model = model.rsplit('/').next().unwrap_or_default();
        let gpt4_classic = model == "gpt-4" || model.starts_with("gpt-4-");
        const CL100K_PREFIXES: [&str; 6] = [
            "gpt-3.5",
            "gpt-35", // Azure's spelling of gpt-3.5
            "text-embedding-3",
            "text-embedding-ada-002",
            "davinci-002",
            "babbage-002",
        ];
        if gpt4_classic || CL100K_PREFIXES.iter().any(|p| model.starts_with(p)) {
            Encoding::Cl100k
        } else {
            Encoding::O200k
        }
    }
}

/// Owns the o200k_base and cl100k_base encoders. `Send + Sync`: share it behind an `Arc`.
pub struct Tokenizer {
    o200k: CoreBPE,
    cl100k: CoreBPE,
}

impl Tokenizer {
    /// Builds both encoders from the BPE data embedded in `tiktoken-rs` (no network).
    pub fn new() -> Tokenizer {
        // The data is compiled into the binary, so failure here is a build defect, and it
        // happens at start-up, never on a request path.
        Tokenizer {
            o200k: tiktoken_rs::o200k_base().expect("embedded o200k_base data is valid"),
            cl100k: tiktoken_rs::cl100k_base().expect("embedded cl100k_base data is valid"),
        }
    }

    /// Tokens of plain text in the model's encoding (used to count streamed output).
    pub fn count_text(&self, model: &str, text: &str) -> u64 {
        self.count(Encoding::for_model(model), text)
    }

    /// Tokens of `text` as ordinary text: special-token strings such as `<|endoftext|>` in
    /// user content are counted as the plain text they are, which is also what the API does.
    pub(crate) fn count(&self, encoding: Encoding, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        let bpe = match encoding {
            Encoding::O200k => &self.o200k,
            Encoding::Cl100k => &self.cl100k,
        };
        bpe.encode_ordinary(text).len() as u64
    }
}

impl Default for Tokenizer {
    fn default() -> Tokenizer {
        Tokenizer::new()
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("Tokenizer { o200k_base, cl100k_base }")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, OnceLock};

    use super::*;

    /// One tokenizer for the whole test binary: building it costs ~200 ms per encoder.
    pub(crate) fn tokenizer() -> &'static Tokenizer {
        static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(Tokenizer::new)
    }

    #[test]
    fn tokenizer_is_shareable_across_tasks() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        let shared = Arc::new(Tokenizer::new());
        let other = Arc::clone(&shared);
        let n = std::thread::spawn(move || other.count_text("gpt-4o", "hello world"))
            .join()
            .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn models_map_to_their_family_encoding() {
        use Encoding::*;
        let cases = [
            ("gpt-4o", O200k),
            ("gpt-4o-mini-2024-07-18", O200k),
            ("chatgpt-4o-latest", O200k),
            ("gpt-4.1-nano", O200k),
            ("gpt-4.5-preview", O200k),
            ("o1-mini", O200k),
            ("o3", O200k),
            ("o4-mini", O200k),
            ("gpt-5", O200k),
            ("llama-3-70b", O200k),
            ("", O200k),
            ("gpt-4", Cl100k),
            ("gpt-4-0613", Cl100k),
            ("gpt-4-turbo", Cl100k),
            ("gpt-4-32k", Cl100k),
            ("gpt-3.5-turbo-0125", Cl100k),
            ("gpt-35-turbo", Cl100k),
            ("text-embedding-3-small", Cl100k),
            ("text-embedding-ada-002", Cl100k),
            ("ft:gpt-4o-mini:org::id", O200k),
            ("ft:gpt-3.5-turbo-0125:acme:suffix:abc123", Cl100k),
            ("openai/gpt-4", Cl100k),
        ];
        for (model, want) in cases {
            assert_eq!(Encoding::for_model(model), want, "{model}");
        }
    }

    #[test]
    fn encodings_differ_where_the_cookbook_says_they_do() {
        // "How to count tokens with tiktoken", section 5: お誕生日おめでとう is 9 tokens in
        // cl100k_base and 8 in o200k_base.
        let t = tokenizer();
        assert_eq!(t.count_text("gpt-4", "お誕生日おめでとう"), 9);
        assert_eq!(t.count_text("gpt-4o", "お誕生日おめでとう"), 8);
        // Section 4: "tiktoken is great!" is 6 tokens in cl100k_base.
        assert_eq!(t.count_text("gpt-3.5-turbo", "tiktoken is great!"), 6);
    }

    #[test]
    fn special_token_text_counts_as_ordinary_text() {
        let t = tokenizer();
        // Encoded as plain text it is several tokens, not the single special token.
        assert!(t.count_text("gpt-4o", "<|endoftext|>") > 1);
        assert_eq!(t.count_text("gpt-4o", ""), 0);
    }
}
