//! `CREATE TABLE name (col type [NOT NULL | NULL | PRIMARY KEY], …, [PRIMARY KEY (…)])`.

use datafusion::sql::sqlparser::ast::{self, ColumnOption, TableConstraint};

use crate::catalog::types::SqlType;
use crate::catalog::{ColumnDef, TableDef};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::sql::{normalize_ident, object_name, Outcome};

/// Creates a durable table.
pub async fn execute(engine: &Engine, ct: &ast::CreateTable) -> Result<Outcome> {
    if ct.query.is_some() {
        return Err(Error::unsupported(
            "CREATE TABLE … AS SELECT is not supported; use CREATE TABLE and INSERT … SELECT",
        ));
    }
    if ct.like.is_some() || ct.clone.is_some() {
        return Err(Error::unsupported(
            "CREATE TABLE … LIKE/CLONE is not supported",
        ));
    }
    if ct.temporary || ct.external {
        return Err(Error::unsupported(
            "TEMPORARY and EXTERNAL tables are not supported",
        ));
    }
    let name = object_name(&ct.name)?;
    if ct.if_not_exists && engine.catalog.get(&name).is_some() {
        return Ok(Outcome::Command {
            tag: "CREATE TABLE",
            rows: None,
        });
    }
    let def = table_def(&name, ct)?;
    let _writer = engine.writer().await;
    match engine.catalog.create_table(def) {
        Ok(_) => {}
        Err(Error::DuplicateObject(_)) if ct.if_not_exists => {}
        Err(e) => return Err(e),
    }
    Ok(Outcome::Command {
        tag: "CREATE TABLE",
        rows: None,
    })
}

/// Builds the table definition, validating names, types and constraints.
pub fn table_def(name: &str, ct: &ast::CreateTable) -> Result<TableDef> {
    if ct.columns.is_empty() {
        return Err(Error::unsupported(
            "tables without columns are not supported",
        ));
    }
    let mut columns: Vec<ColumnDef> = Vec::new();
    let mut primary_key: Vec<usize> = Vec::new();
    for (idx, c) in ct.columns.iter().enumerate() {
        let cname = normalize_ident(&c.name);
        if columns.iter().any(|x| x.name == cname) {
            return Err(Error::Plan(format!(
                "column \"{cname}\" specified more than once"
            )));
        }
        let ty = SqlType::from_ast(&c.data_type)?;
        let mut nullable = true;
        for opt in &c.options {
            match &opt.option {
                ColumnOption::Null => {}
                ColumnOption::NotNull => nullable = false,
                ColumnOption::PrimaryKey(_) => {
                    if !primary_key.is_empty() {
                        return Err(Error::Plan(format!(
                            "multiple primary keys for table \"{name}\" are not allowed"
                        )));
                    }
                    primary_key.push(idx);
                }
                other => {
                    return Err(Error::unsupported(format!(
                        "column option {other} is not supported"
                    )))
                }
            }
        }
        columns.push(ColumnDef {
            name: cname,
            ty,
            nullable,
        });
    }
    for constraint in &ct.constraints {
        match constraint {
            TableConstraint::PrimaryKey(pk) => {
                if !primary_key.is_empty() {
                    return Err(Error::Plan(format!(
                        "multiple primary keys for table \"{name}\" are not allowed"
                    )));
                }
                for ic in &pk.columns {
                    let ast::Expr::Identifier(id) = &ic.column.expr else {
                        return Err(Error::unsupported("primary key on an expression"));
                    };
                    let cname = normalize_ident(id);
                    let idx = columns
                        .iter()
                        .position(|c| c.name == cname)
                        .ok_or_else(|| {
                            Error::UndefinedColumn(format!(
                                "column \"{cname}\" named in key does not exist"
                            ))
                        })?;
                    if primary_key.contains(&idx) {
                        return Err(Error::Plan(format!(
                            "column \"{cname}\" appears twice in primary key constraint"
                        )));
                    }
                    primary_key.push(idx);
                }
            }
            other => {
                return Err(Error::unsupported(format!(
                    "table constraint {other} is not supported"
                )))
            }
        }
    }
    for &idx in &primary_key {
        columns[idx].nullable = false;
        if matches!(columns[idx].ty, SqlType::Array(_)) {
            return Err(Error::unsupported(
                "array columns cannot be part of a primary key",
            ));
        }
    }
    Ok(TableDef {
        id: 0,
        name: name.to_string(),
        columns,
        primary_key,
    })
}
