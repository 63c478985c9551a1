//! PostgreSQL compatibility functions and plan rewrites.
//!
//! `bytea` text input: PostgreSQL reads `'\x00ff'` (hex) or `'a\000b'`
//! (escape) when a string becomes `bytea`; DataFusion's cast would store the
//! string's own bytes. [`ByteaTextInput`] is an analyzer rule, run after
//! DataFusion's type coercion, that replaces every `CAST(<text> AS bytea)`
//! with `pg_bytea_in(<text>)`, which parses PostgreSQL's formats.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, BinaryBuilder};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{
    create_udf, ColumnarValue, Expr, ExprSchemable, LogicalPlan, ScalarUDF, Volatility,
};
use datafusion::optimizer::AnalyzerRule;

/// Name of the bytea input function.
pub const BYTEA_IN: &str = "pg_bytea_in";

/// Parses PostgreSQL's bytea text input (hex `\x…` or escape format).
pub fn parse_bytea(s: &str) -> Result<Vec<u8>, String> {
    let bad = || format!("invalid input syntax for type bytea: \"{s}\"");
    if let Some(hex) = s.strip_prefix("\\x").or_else(|| s.strip_prefix("\\X")) {
        let digits: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        if !digits.len().is_multiple_of(2) {
            return Err(bad());
        }
        return digits
            .chunks(2)
            .map(|p| {
                let h = (p[0] as char).to_digit(16).ok_or_else(bad)?;
                let l = (p[1] as char).to_digit(16).ok_or_else(bad)?;
                Ok((h * 16 + l) as u8)
            })
            .collect();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
        } else if b.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else if i + 3 < b.len() && b[i + 1..=i + 3].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(u8::try_from(v).map_err(|_| bad())?);
            i += 4;
        } else {
            return Err(bad());
        }
    }
    Ok(out)
}

/// The `pg_bytea_in(text) → bytea` function.
pub fn bytea_in_udf() -> ScalarUDF {
    create_udf(
        BYTEA_IN,
        vec![DataType::Utf8],
        DataType::Binary,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arr: ArrayRef = match &args[0] {
                ColumnarValue::Array(a) => a.clone(),
                ColumnarValue::Scalar(s) => s.to_array()?,
            };
            let arr = datafusion::arrow::compute::cast(&arr, &DataType::Utf8)?;
            let strings = arr.as_string::<i32>();
            let mut b = BinaryBuilder::new();
            for v in strings.iter() {
                match v {
                    None => b.append_null(),
                    Some(s) => b.append_value(parse_bytea(s).map_err(|m| {
                        DataFusionError::ArrowError(
                            Box::new(datafusion::arrow::error::ArrowError::CastError(format!(
                                "Cannot cast string '{s}' to value of Binary type: {m}"
                            ))),
                            None,
                        )
                    })?),
                }
            }
            let out: ArrayRef = Arc::new(b.finish());
            Ok(match &args[0] {
                ColumnarValue::Scalar(_) => {
                    ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?)
                }
                ColumnarValue::Array(_) => ColumnarValue::Array(out),
            })
        }),
    )
}

/// Rewrites text → bytea casts to [`BYTEA_IN`].
#[derive(Debug)]
pub struct ByteaTextInput {
    udf: Arc<ScalarUDF>,
}

impl Default for ByteaTextInput {
    fn default() -> Self {
        ByteaTextInput {
            udf: Arc::new(bytea_in_udf()),
        }
    }
}

impl AnalyzerRule for ByteaTextInput {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> DfResult<LogicalPlan> {
        plan.transform_up_with_subqueries(|node| {
            let inputs = node.inputs();
            let schema: DFSchema = if inputs.len() == 1 {
                inputs[0].schema().as_ref().clone()
            } else {
                node.schema().as_ref().clone()
            };
            node.map_expressions(|e| {
                e.transform_up(|e| match &e {
                    Expr::Cast(c)
                        if matches!(c.field.data_type(), DataType::Binary)
                            && matches!(
                                c.expr.get_type(&schema),
                                Ok(DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8)
                            ) =>
                    {
                        let arg = Expr::Cast(datafusion::logical_expr::Cast::new(
                            c.expr.clone(),
                            DataType::Utf8,
                        ));
                        Ok(Transformed::yes(self.udf.call(vec![arg])))
                    }
                    _ => Ok(Transformed::no(e)),
                })
            })
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "sluice_bytea_text_input"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_escape() {
        assert_eq!(parse_bytea("\\x00ff10").unwrap(), vec![0, 255, 16]);
        assert_eq!(
            parse_bytea("ab\\000c\\\\").unwrap(),
            vec![b'a', b'b', 0, b'c', b'\\']
        );
        assert!(parse_bytea("\\x0").is_err());
        assert!(parse_bytea("\\q").is_err());
    }
}
