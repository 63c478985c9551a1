// pgjdbc against Sluice: connect, DDL, prepared statements with parameters
// (binary transfer after the prepare threshold), metadata, errors.
// Run: java -cp /usr/share/java/postgresql.jar JdbcSmoke.java PORT
import java.math.BigDecimal;
import java.sql.*;

public class JdbcSmoke {
    static void check(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/sluice?prepareThreshold=1&connectTimeout=10&socketTimeout=60";
        try (Connection c = DriverManager.getConnection(url, "jdbc", "")) {
            try (Statement s = c.createStatement()) {
                s.execute("CREATE TABLE jt (id INT PRIMARY KEY, name TEXT, price NUMERIC(10,2), at TIMESTAMP, ok BOOLEAN)");
            }
            try (PreparedStatement p = c.prepareStatement("INSERT INTO jt VALUES (?, ?, ?, ?, ?)")) {
                for (int i = 1; i <= 5; i++) {
                    p.setInt(1, i);
                    p.setString(2, "item" + i);
                    p.setBigDecimal(3, new BigDecimal(i + ".25"));
                    p.setTimestamp(4, Timestamp.valueOf("2024-01-0" + i + " 10:00:00"));
                    p.setBoolean(5, i % 2 == 0);
                    check(p.executeUpdate() == 1, "insert count");
                }
            }
            // Repeated executions switch pgjdbc to named, binary statements.
            try (PreparedStatement p = c.prepareStatement("SELECT name, price, at, ok FROM jt WHERE id = ?")) {
                for (int round = 0; round < 5; round++) {
                    p.setInt(1, 3);
                    try (ResultSet rs = p.executeQuery()) {
                        check(rs.next(), "row");
                        check(rs.getString(1).equals("item3"), "name " + rs.getString(1));
                        check(rs.getBigDecimal(2).compareTo(new BigDecimal("3.25")) == 0, "price " + rs.getBigDecimal(2));
                        check(rs.getTimestamp(3).equals(Timestamp.valueOf("2024-01-03 10:00:00")), "at " + rs.getTimestamp(3));
                        check(!rs.getBoolean(4), "ok");
                        check(!rs.next(), "one row");
                    }
                }
            }
            try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT count(*), sum(price) FROM jt")) {
                check(rs.next() && rs.getLong(1) == 5, "count");
                check(rs.getBigDecimal(2).compareTo(new BigDecimal("16.25")) == 0, "sum " + rs.getBigDecimal(2));
            }
            // Errors carry SQLSTATE and the connection stays usable.
            try (Statement s = c.createStatement()) {
                s.execute("INSERT INTO jt (id, name) VALUES (1, 'dup')");
                check(false, "duplicate accepted");
            } catch (SQLException e) {
                check("23505".equals(e.getSQLState()), "sqlstate " + e.getSQLState());
            }
            // Transactions as JDBC drives them (autocommit off → BEGIN … COMMIT).
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.executeUpdate("UPDATE jt SET name = 'changed' WHERE id = 5");
            }
            c.commit();
            c.setAutoCommit(true);
            // Metadata queries BI tools issue.
            DatabaseMetaData md = c.getMetaData();
            check(md.getDatabaseProductVersion().startsWith("15"), "version " + md.getDatabaseProductVersion());
            boolean found = false;
            try (ResultSet rs = md.getTables(null, null, "jt", null)) {
                while (rs.next()) found |= rs.getString("TABLE_NAME").equals("jt");
            }
            check(found, "getTables finds jt");
        }
        System.out.println("jdbc ok");
    }
}
