//! `CREATE VIEW name AS SELECT …` (non-materialized: expanded at planning time).

use datafusion::sql::sqlparser::ast;

use crate::catalog::ViewDef;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::sql::{object_name, Outcome};

/// Creates a view.
pub async fn execute(engine: &Engine, cv: &ast::CreateView) -> Result<Outcome> {
    if cv.materialized {
        return super::create_mv::execute(engine, cv).await;
    }
    if cv.or_replace || cv.or_alter {
        return Err(Error::unsupported(
            "CREATE OR REPLACE VIEW is not supported",
        ));
    }
    if !cv.columns.is_empty() {
        return Err(Error::unsupported(
            "a column list in CREATE VIEW is not supported; alias the columns in the query",
        ));
    }
    let name = object_name(&cv.name)?;
    if engine.catalog.get(&name).is_some() {
        if cv.if_not_exists {
            return Ok(Outcome::Command {
                tag: "CREATE VIEW",
                rows: None,
            });
        }
        return Err(Error::DuplicateObject(name));
    }
    let query = ast::Statement::Query(cv.query.clone());
    let plan = engine.plan(&query).await?;
    let depends_on = referenced_relations(engine, &cv.query);
    if depends_on.contains(&name) {
        return Err(Error::Plan(format!("view \"{name}\" cannot read itself")));
    }
    let def = ViewDef {
        id: 0,
        name,
        sql: cv.query.to_string(),
        depends_on,
    };
    let _writer = engine.writer().await;
    engine.catalog.create_view(def, plan)?;
    Ok(Outcome::Command {
        tag: "CREATE VIEW",
        rows: None,
    })
}

/// Names of the catalog relations `query` reads (tables and views, not
/// CTEs or `pg_catalog` tables), found by walking the AST.
pub fn referenced_relations(engine: &Engine, query: &ast::Query) -> Vec<String> {
    let mut names = Vec::new();
    let _ = ast::visit_relations(query, |rel: &ast::ObjectName| {
        if let Ok(name) = object_name(rel) {
            if engine.catalog.get(&name).is_some() && !names.contains(&name) {
                names.push(name);
            }
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
    names
}
