//! A cursor over sqlparser's tokens, for the statements Sluice parses
//! itself (sources, sinks, connections in [`super::source`]; SUBSCRIBE,
//! COPY and cursors in [`super::subscribe`]): keywords, names as
//! PostgreSQL folds them, and embedded queries handed back as text for
//! sqlparser.

use datafusion::sql::sqlparser::tokenizer::Token;

use crate::error::{Error, Result};

/// The upper-cased text of an unquoted word; empty for anything else.
pub fn upper_word(t: &Token) -> String {
    match t {
        Token::Word(w) if w.quote_style.is_none() => w.value.to_ascii_uppercase(),
        _ => String::new(),
    }
}

/// A position in a statement's tokens, whitespace left out.
pub struct Cursor<'a> {
    /// The tokens.
    pub tokens: Vec<&'a Token>,
    /// The next one.
    pub pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor over `tokens` without their whitespace.
    pub fn new(tokens: &'a [Token]) -> Cursor<'a> {
        Cursor {
            tokens: tokens
                .iter()
                .filter(|t| !matches!(t, Token::Whitespace(_)))
                .collect(),
            pos: 0,
        }
    }

    /// The next token if it is an unquoted word, upper-cased.
    pub fn word(&self) -> Option<String> {
        match self.peek() {
            Some(Token::Word(w)) if w.quote_style.is_none() => Some(w.value.to_ascii_uppercase()),
            _ => None,
        }
    }

    /// The rest of the statement as text (tokens joined by spaces, which
    /// SQL reads the same).
    pub fn rest_text(&mut self) -> String {
        let rest: Vec<String> = self.tokens[self.pos..]
            .iter()
            .map(|t| t.to_string())
            .collect();
        self.pos = self.tokens.len();
        rest.join(" ")
    }

    /// The next token, if any.
    pub fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos).copied()
    }

    /// `at or near "x"` for error messages.
    pub fn found(&self) -> String {
        match self.peek() {
            Some(t) => format!("at or near \"{t}\""),
            None => "at end of input".to_string(),
        }
    }

    /// A syntax error (42601) at the current token.
    pub fn error(&self, expected: &str) -> Error {
        Error::Syntax(format!(
            "syntax error {}: expected {expected}",
            self.found()
        ))
    }

    /// Consumes keyword `kw` (upper case) if it is next.
    pub fn keyword(&mut self, kw: &str) -> bool {
        if self.peek().map(upper_word).as_deref() == Some(kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Consumes keyword `kw` or fails.
    pub fn expect_keyword(&mut self, kw: &str) -> Result<()> {
        if self.keyword(kw) {
            Ok(())
        } else {
            Err(self.error(kw))
        }
    }

    /// Consumes token `t` if it is next.
    pub fn token(&mut self, t: &Token) -> bool {
        if self.peek() == Some(t) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// An identifier: unquoted ones are lower-cased, as in PostgreSQL.
    pub fn ident(&mut self) -> Result<String> {
        match self.peek() {
            Some(Token::Word(w)) => {
                let name = if w.quote_style.is_some() {
                    w.value.clone()
                } else {
                    w.value.to_lowercase()
                };
                self.pos += 1;
                // `public.name`
                if self.token(&Token::Period) {
                    if name != crate::engine::SCHEMA {
                        return Err(Error::unsupported(format!(
                            "schema \"{name}\" does not exist; only \"public\" is supported"
                        )));
                    }
                    return self.ident();
                }
                Ok(name)
            }
            _ => Err(self.error("a name")),
        }
    }

    /// `[IF EXISTS]`.
    pub fn if_exists(&mut self) -> Result<bool> {
        Ok(self.keyword("IF") && {
            self.expect_keyword("EXISTS")?;
            true
        })
    }

    /// `[IF NOT EXISTS]`.
    pub fn if_not_exists(&mut self) -> Result<bool> {
        Ok(self.keyword("IF") && {
            self.expect_keyword("NOT")?;
            self.expect_keyword("EXISTS")?;
            true
        })
    }

    /// `[CASCADE | RESTRICT]`: whether CASCADE.
    pub fn cascade(&mut self) -> bool {
        self.keyword("CASCADE") || {
            self.keyword("RESTRICT");
            false
        }
    }

    /// Fails unless every token was consumed.
    pub fn end(&self) -> Result<()> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.error("end of statement")),
        }
    }

    /// The text inside parentheses whose `(` was just consumed (tokens
    /// joined by spaces, which SQL reads the same), up to the matching `)`.
    pub fn parenthesized_text(&mut self) -> Result<String> {
        let start = self.pos;
        let mut depth = 1usize;
        while let Some(t) = self.tokens.get(self.pos).copied() {
            self.pos += 1;
            match t {
                Token::LParen => depth += 1,
                Token::RParen => {
                    depth -= 1;
                    if depth == 0 {
                        let inner: Vec<String> = self.tokens[start..self.pos - 1]
                            .iter()
                            .map(|t| t.to_string())
                            .collect();
                        return Ok(inner.join(" "));
                    }
                }
                _ => {}
            }
        }
        Err(self.error("\")\""))
    }
}
