// node-postgres through pgtwist (or straight to PostgreSQL) while its server backend is terminated.
//
// Usage: node killed_server.js SCENARIO MARKER, with PGTWIST_TARGET (pg Client config, JSON) and
// PGTWIST_ADMINS (a superuser Client config per node, JSON list) in the environment. The backend
// running the statement that carries MARKER is found on whichever node it is, and terminated.
// Prints one JSON line: every query's outcome and every 'error' / 'end' event of the client, in order.
'use strict'
const { Client } = require('pg')

const [scenario, marker] = process.argv.slice(2)
const target = JSON.parse(process.env.PGTWIST_TARGET)
const admins = JSON.parse(process.env.PGTWIST_ADMINS)
const events = []
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

function describe(e) {
  return { code: e.code || null, severity: e.severity || null, message: e.message, detail: e.detail || null }
}

async function terminate(state) {
  const deadline = Date.now() + 15000
  while (Date.now() < deadline) {
    for (const config of admins) {
      const admin = new Client(config)
      await admin.connect()
      try {
        const found = await admin.query(
          'SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND state = $1 AND query LIKE $2',
          [state, '%' + marker + '%']
        )
        if (found.rows.length) {
          const pid = found.rows[0].pid
          await admin.query('SELECT pg_terminate_backend($1)', [pid])
          while ((await admin.query('SELECT count(*)::int AS n FROM pg_stat_activity WHERE pid = $1', [pid])).rows[0].n) {
            await sleep(20)
          }
          return
        }
      } finally {
        await admin.end()
      }
    }
    await sleep(50)
  }
  throw new Error(`no ${state} backend running ${marker}`)
}

async function step(client, name, sql) {
  try {
    const result = await client.query(sql)
    events.push({ step: name, ok: true, rows: result.rows })
  } catch (e) {
    events.push({ step: name, ok: false, error: describe(e) })
  }
}

async function main() {
  const client = new Client(target)
  client.on('error', (e) => events.push({ step: 'error event', error: describe(e) }))
  client.on('end', () => events.push({ step: 'end' }))
  await client.connect()
  if (scenario === 'during') {
    const running = step(client, 'sleep', `SELECT pg_sleep(30) /* ${marker} */`)
    await terminate('active')
    await running
    await sleep(300) // whatever else the client is told arrives now
    await step(client, 'after', 'SELECT 1 AS one')
  } else if (scenario === 'in_tx') {
    await step(client, 'begin', 'BEGIN')
    await step(client, 'in tx', `SELECT 1 /* ${marker} */`)
    await terminate('idle in transaction')
    await sleep(300)
    await step(client, 'next', 'SELECT 2 AS two')
    await step(client, 'again', 'SELECT 3 AS three')
    await step(client, 'rollback', 'ROLLBACK')
    await step(client, 'after', 'SELECT 1 AS one')
  } else {
    throw new Error(`unknown scenario ${scenario}`)
  }
  await sleep(100)
  client.removeAllListeners('end') // (only an end the client did not ask for is an event)
  try {
    await client.end()
  } catch (e) {
    // (already closed)
  }
  console.log(JSON.stringify(events))
}

main().catch((e) => {
  console.log(JSON.stringify(events))
  console.error(e)
  process.exit(1)
})
