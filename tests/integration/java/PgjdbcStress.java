// pgjdbc through pgtwist in transaction pooling mode: server-prepared statements, batches and a
// transaction per thread, many threads over a small pool. Compiled and run by test_pgjdbc.py.
//
// Usage: java -cp postgresql.jar:. PgjdbcStress URL USER PASSWORD THREADS ROUNDS TABLE
// Prints one line "PGJDBC-SUMMARY threads=.. ok=.. failed=.. queries=.. server_prepared=.. batch_rows=.. commits=.. rollbacks=.."
// and, for each failed thread, "PGJDBC-FAILURE thread=N: <stack trace>" on stderr. Exit status 0 only if every thread passed.

import java.io.PrintWriter;
import java.io.StringWriter;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;

import org.postgresql.PGStatement;

public class PgjdbcStress {
    static final AtomicLong queries = new AtomicLong();
    static final AtomicLong serverPrepared = new AtomicLong();
    static final AtomicLong batchRows = new AtomicLong();
    static final AtomicLong commits = new AtomicLong();
    static final AtomicLong rollbacks = new AtomicLong();

    public static void main(String[] args) throws Exception {
        if (args.length != 6) {
            System.err.println("usage: PgjdbcStress URL USER PASSWORD THREADS ROUNDS TABLE");
            System.exit(2);
        }
        final String url = args[0];
        final String user = args[1];
        final String password = args[2];
        final int threads = Integer.parseInt(args[3]);
        final int rounds = Integer.parseInt(args[4]);
        final String table = args[5];

        ExecutorService pool = Executors.newFixedThreadPool(threads);
        List<Future<?>> futures = new ArrayList<>();
        for (int t = 0; t < threads; t++) {
            final int thread = t;
            futures.add(pool.submit(() -> {
                work(url, user, password, thread, rounds, table);
                return null;
            }));
        }
        pool.shutdown();
        int ok = 0;
        int failed = 0;
        for (int t = 0; t < threads; t++) {
            try {
                futures.get(t).get(120, TimeUnit.SECONDS);
                ok++;
            } catch (Exception e) {
                failed++;
                Throwable cause = e.getCause() != null ? e.getCause() : e;
                StringWriter trace = new StringWriter();
                cause.printStackTrace(new PrintWriter(trace));
                System.err.println("PGJDBC-FAILURE thread=" + t + ": " + trace);
            }
        }
        pool.shutdownNow();
        System.out.println("PGJDBC-SUMMARY threads=" + threads + " ok=" + ok + " failed=" + failed
                + " queries=" + queries.get() + " server_prepared=" + serverPrepared.get()
                + " batch_rows=" + batchRows.get() + " commits=" + commits.get() + " rollbacks=" + rollbacks.get());
        System.exit(failed == 0 ? 0 : 1);
    }

    static void check(boolean condition, String what) {
        if (!condition) {
            throw new AssertionError(what);
        }
    }

    static void work(String url, String user, String password, int thread, int rounds, String table) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", user);
        props.setProperty("password", password);
        props.setProperty("prepareThreshold", "1"); // server-prepare (named statements) from the first use
        props.setProperty("ApplicationName", "pgjdbc-stress-" + thread);
        props.setProperty("connectTimeout", "10");
        props.setProperty("socketTimeout", "60");
        props.setProperty("sslmode", "disable");
        try (Connection conn = DriverManager.getConnection(url, props)) {
            // Server-prepared statements with parameters, over many transactions (autocommit).
            try (PreparedStatement ps = conn.prepareStatement("SELECT ?::int + 1, ?::text || '!', current_setting('application_name')")) {
                for (int i = 0; i < rounds; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "t" + thread);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next(), "a row");
                        check(rs.getInt(1) == i + 1, "sum " + rs.getInt(1) + " != " + (i + 1));
                        check(rs.getString(2).equals("t" + thread + "!"), "text " + rs.getString(2));
                        check(rs.getString(3).equals("pgjdbc-stress-" + thread), "application_name " + rs.getString(3));
                        check(!rs.next(), "one row");
                    }
                    queries.incrementAndGet();
                }
                if (ps.unwrap(PGStatement.class).isUseServerPrepare()) {
                    serverPrepared.incrementAndGet();
                }
            }
            // A second statement, closed and prepared again: Close of a named statement, then a new name.
            for (int k = 0; k < 3; k++) {
                try (PreparedStatement ps = conn.prepareStatement("SELECT count(*) FROM " + table + " WHERE thread = ? AND k >= ?")) {
                    ps.setInt(1, thread);
                    ps.setInt(2, 0);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next(), "a count");
                    }
                    queries.incrementAndGet();
                }
            }
            // Batches (one Sync for many Bind/Execute), autocommit.
            try (PreparedStatement ins = conn.prepareStatement("INSERT INTO " + table + " (thread, k, note) VALUES (?, ?, ?)")) {
                for (int b = 0; b < 2; b++) {
                    for (int i = 0; i < rounds; i++) {
                        ins.setInt(1, thread);
                        ins.setInt(2, b * rounds + i);
                        ins.setString(3, "batch");
                        ins.addBatch();
                    }
                    int[] counts = ins.executeBatch();
                    check(counts.length == rounds, "batch size " + counts.length);
                    for (int c : counts) {
                        check(c == 1 || c == Statement.SUCCESS_NO_INFO, "batch count " + c);
                    }
                    batchRows.addAndGet(counts.length);
                }
            }
            // A transaction: several statements on one server connection, committed.
            conn.setAutoCommit(false);
            try (PreparedStatement ins = conn.prepareStatement("INSERT INTO " + table + " (thread, k, note) VALUES (?, ?, ?)");
                 PreparedStatement pid = conn.prepareStatement("SELECT pg_backend_pid(), txid_current()")) {
                long firstPid = -1;
                long firstXid = -1;
                for (int i = 0; i < 5; i++) {
                    ins.setInt(1, thread);
                    ins.setInt(2, 100000 + i);
                    ins.setString(3, "tx");
                    check(ins.executeUpdate() == 1, "insert in transaction");
                    try (ResultSet rs = pid.executeQuery()) {
                        check(rs.next(), "pid row");
                        if (firstPid < 0) {
                            firstPid = rs.getLong(1);
                            firstXid = rs.getLong(2);
                        }
                        check(rs.getLong(1) == firstPid, "one server connection per transaction");
                        check(rs.getLong(2) == firstXid, "one transaction");
                    }
                    queries.incrementAndGet();
                }
                conn.commit();
                commits.incrementAndGet();
                // ...and one rolled back.
                ins.setInt(1, thread);
                ins.setInt(2, 200000);
                ins.setString(3, "rolled back");
                ins.executeUpdate();
                conn.rollback();
                rollbacks.incrementAndGet();
            }
            conn.setAutoCommit(true);
            try (PreparedStatement ps = conn.prepareStatement("SELECT count(*) FROM " + table + " WHERE thread = ?")) {
                ps.setInt(1, thread);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next(), "final count");
                    check(rs.getLong(1) == 2L * rounds + 5, "rows of thread " + thread + ": " + rs.getLong(1));
                }
                queries.incrementAndGet();
            }
        }
    }
}
