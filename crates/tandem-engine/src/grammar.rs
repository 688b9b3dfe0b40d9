//! Constrained decoding with llguidance: a request's [`Grammar`] (JSON schema, any JSON object,
//! regex, a choice of strings, or a Lark grammar) is compiled against the model's tokenizer
//! into a [`Constraint`], which gives the set of tokens allowed next and advances with each
//! token chosen.
//!
//! The mask for a sequence's next token is computed on a helper thread right after its
//! previous token was consumed, so it is ready (or nearly) when the next forward pass ends:
//! constrained requests do not stall the batch they share.

use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use tandem_model::Tokenizer;

use crate::error::ParamError;

/// What a request's output must match.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grammar {
    /// A JSON value valid against this JSON schema.
    JsonSchema(serde_json::Value),
    /// Any JSON object.
    JsonObject,
    /// A string matching this regular expression.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect, which can embed `%json` schemas).
    Lark(String),
}

/// Whitespace allowed between two tokens of a JSON value, unless the schema sets its own
/// (llguidance's `x-guidance` options): any mix of spaces, tabs and newlines, at most twenty
/// characters (a newline and nineteen of indentation; llama.cpp's JSON grammars bound it
/// likewise). llguidance's default (any run of whitespace) let the reference model, sampling at
/// temperature 0.8, fill all of its `max_tokens` with newlines after a value and never close
/// the object.
const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,20}";

/// `schema` with [`JSON_WHITESPACE`] as its whitespace, where it names none.
fn bounded_whitespace(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({ "whitespace_pattern": JSON_WHITESPACE }));
    }
    schema
}

impl Grammar {
    fn top_level(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Grammar::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(bounded_whitespace(schema.clone()))
            }
            Grammar::JsonObject => TopLevelGrammar::from_json_schema(bounded_whitespace(
                serde_json::json!({"type": "object"}),
            )),
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Choice(options) => {
                if options.is_empty() {
                    return Err("the choice list is empty".into());
                }
                let alts: Vec<String> = options
                    .iter()
                    .map(|o| serde_json::to_string(o).expect("a string serializes"))
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            Grammar::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
        })
    }
}

/// The model's tokenizer as llguidance sees it.
struct Env {
    trie: TokTrie,
    tok: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.tok
            .encode(&String::from_utf8_lossy(s), false)
            .unwrap_or_default()
    }
}

/// Compiles grammars for one model (built on first use: the token trie takes a moment).
pub struct GrammarCompiler {
    tok: Arc<Tokenizer>,
    vocab: usize,
    factory: OnceLock<Result<ParserFactory, String>>,
}

impl GrammarCompiler {
    /// A compiler for `tok`, whose model produces `vocab` logits per token.
    pub fn new(tok: Arc<Tokenizer>, vocab: usize) -> Self {
        GrammarCompiler {
            tok,
            vocab,
            factory: OnceLock::new(),
        }
    }

    fn build(&self) -> Result<ParserFactory, String> {
        let json: serde_json::Value = serde_json::from_str(
            &self
                .tok
                .inner()
                .to_string(false)
                .map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        let mut words = std::panic::catch_unwind(|| {
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())
        })
        .map_err(|_| "the tokenizer's vocabulary cannot be read as bytes".to_string())??;
        // Logit rows past the tokenizer's vocabulary (padding) are tokens nothing matches.
        if words.len() < self.vocab {
            words.resize(self.vocab, Vec::new());
        }
        let eos = self.tok.eos_ids();
        let mut info = TokRxInfo::new(words.len() as u32, eos.first().copied().unwrap_or(0));
        info.tok_bos = self.tok.bos_id();
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(Env {
            trie,
            tok: self.tok.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(factory)
    }

    /// Compiles `g` into a fresh constraint; a grammar llguidance refuses is an error naming
    /// the problem.
    pub fn compile(&self, g: &Grammar) -> Result<Constraint, ParamError> {
        let invalid = |why: String| ParamError::Invalid {
            name: "grammar",
            why,
        };
        let factory = self
            .factory
            .get_or_init(|| self.build())
            .as_ref()
            .map_err(|e| invalid(format!("constrained decoding is unavailable: {e}")))?;
        let top = g.top_level().map_err(invalid)?;
        let parser = factory
            .create_parser(top)
            .map_err(|e| invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(e));
        }
        Ok(Constraint {
            matcher: Some(matcher),
            pending: None,
        })
    }
}

/// A mask being computed on a helper thread, with the matcher it borrowed.
type Pending = Receiver<(Matcher, Result<SimpleVob, String>)>;

/// One sequence's grammar state.
pub struct Constraint {
    /// None while a helper thread computes the next mask with it.
    matcher: Option<Matcher>,
    pending: Option<Pending>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Starts computing the mask for the next token on a helper thread (no-op if already
    /// started).
    pub fn prefetch_mask(&mut self) {
        let Some(mut m) = self.matcher.take() else {
            return;
        };
        let (tx, rx) = mpsc::channel();
        spawn_helper(move || {
            let mask = m.compute_mask_or_eos().map_err(|e| e.to_string());
            let _ = tx.send((m, mask));
        });
        self.pending = Some(rx);
    }

    /// The tokens allowed next (EOS only once the grammar is complete).
    pub fn mask(&mut self) -> Result<SimpleVob, String> {
        self.prefetch_mask();
        let rx = self.pending.take().expect("prefetch started");
        let (m, mask) = rx
            .recv()
            .map_err(|_| "the grammar thread failed".to_string())?;
        self.matcher = Some(m);
        mask
    }

    fn matcher(&mut self) -> &mut Matcher {
        if let Some(rx) = self.pending.take() {
            if let Ok((m, _)) = rx.recv() {
                self.matcher = Some(m);
            }
        }
        self.matcher.as_mut().expect("matcher present")
    }

    /// Advances past `token`; an error if the grammar does not allow it.
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.matcher()
            .consume_token(token)
            .map_err(|e| e.to_string())
    }

    /// Whether the grammar admits no further token (the output is complete).
    pub fn is_finished(&mut self) -> bool {
        self.matcher().is_stopped()
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Runs `f` on the helper thread shared by every constraint (inline if it cannot start).
fn spawn_helper(f: impl FnOnce() + Send + 'static) {
    static HELPER: OnceLock<Option<std::sync::Mutex<mpsc::Sender<Job>>>> = OnceLock::new();
    let helper = HELPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("tandem-grammar".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .ok()
            .map(|_| std::sync::Mutex::new(tx))
    });
    let job: Job = Box::new(f);
    let rejected = match helper {
        Some(tx) => tx.lock().expect("helper lock").send(job).err().map(|e| e.0),
        None => Some(job),
    };
    if let Some(job) = rejected {
        job();
    }
}
