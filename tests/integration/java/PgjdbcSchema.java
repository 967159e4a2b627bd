// pgjdbc and schema changes: a server-prepared statement (prepareThreshold=1) run before and
// after columns are added by another connection, outside and inside a transaction, and by a new
// connection. Compiled and run by test_schema_changes.py, once straight against PostgreSQL and
// once through pgtwist; the two transcripts must be the same.
//
// Usage: java -cp postgresql.jar:. PgjdbcSchema URL DDL_URL USER PASSWORD TABLE
// Prints one line per step: "STEP <name> cols=<n> rows=<values>" or "STEP <name> error=<SQLSTATE>".

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.Properties;

public class PgjdbcSchema {
    static Connection connect(String url, String user, String password) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", user);
        props.setProperty("password", password);
        props.setProperty("prepareThreshold", "1");
        props.setProperty("connectTimeout", "10");
        props.setProperty("socketTimeout", "30");
        return DriverManager.getConnection(url, props);
    }

    static void step(String name, PreparedStatement ps) {
        try (ResultSet rs = ps.executeQuery()) {
            int cols = rs.getMetaData().getColumnCount();
            StringBuilder rows = new StringBuilder();
            while (rs.next()) {
                for (int i = 1; i <= cols; i++) {
                    rows.append(i == 1 ? "" : ",").append(rs.getString(i));
                }
                rows.append(";");
            }
            System.out.println("STEP " + name + " cols=" + cols + " rows=" + rows);
        } catch (SQLException e) {
            System.out.println("STEP " + name + " error=" + e.getSQLState());
        }
    }

    public static void main(String[] args) throws Exception {
        String url = args[0], ddlUrl = args[1], user = args[2], password = args[3], table = args[4];
        String sql = "SELECT * FROM " + table;
        try (Connection a = connect(url, user, password); Connection ddl = connect(ddlUrl, user, password)) {
            PreparedStatement ps = a.prepareStatement(sql);
            step("before-1", ps);
            step("before-2", ps);
            ddl.createStatement().execute("ALTER TABLE " + table + " ADD COLUMN y int DEFAULT 2");
            step("after-add-1", ps);
            step("after-add-2", ps);
            ddl.createStatement().execute("ALTER TABLE " + table + " ADD COLUMN z int DEFAULT 3");
            a.setAutoCommit(false);
            step("in-transaction", ps);
            a.rollback();
            a.setAutoCommit(true);
            step("after-rollback", ps);
            try (Connection b = connect(url, user, password)) {
                PreparedStatement other = b.prepareStatement(sql);
                step("new-connection-1", other);
                step("new-connection-2", other);
            }
            ddl.createStatement().execute("ALTER TABLE " + table + " ALTER COLUMN y TYPE text");
            step("after-type-change", ps);
            step("after-type-change-2", ps);
        }
    }
}
