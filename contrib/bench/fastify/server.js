// GET /api/v1/me the way a careful Node.js service would write it, for
// contrib/bench/me.sh: HTTPS (TLS 1.3) keep-alive, Fastify, fast-jwt (HS256
// with iss/aud/exp checks and the algorithm pinned), an in-memory revocation
// set, the same role check and the same indexed query as cloudsweepd, on a
// pg pool. One process per worker with node:cluster.
//
// env: PORT, WORKERS, TLS_CERT, TLS_KEY, JWT_SECRET_FILE, PGHOST, PGPORT,
//      PGDATABASE, PGUSER, POOL (connections per process)
'use strict';
const cluster = require('node:cluster');
const fs = require('node:fs');

const workers = Number(process.env.WORKERS || 2);

if (cluster.isPrimary) {
  for (let i = 0; i < workers; i++) cluster.fork();
  cluster.on('exit', () => process.exit(1));
} else {
  const { createVerifier } = require('fast-jwt');
  const { Pool } = require('pg');
  const secret = fs.readFileSync(process.env.JWT_SECRET_FILE, 'utf8').trim();
  const verify = createVerifier({
    key: secret,
    algorithms: ['HS256'],
    allowedIss: 'cloudsweep',
    allowedAud: 'cloudsweep-api',
    clockTolerance: 60,
    cache: false,
  });
  const revoked = new Set();
  const pool = new Pool({ max: Number(process.env.POOL || 4) });
  const roles = new Set(['viewer', 'member', 'admin', 'owner']);
  const sql =
    "SELECT json_build_object('id', u.id, 'email', u.email, 'name', u.name, " +
    "'mfa_enabled', u.mfa_enabled, 'github_login', u.github_login, " +
    "'created_at', to_char(u.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), " +
    "'org', json_build_object('id', o.id, 'name', o.name), 'role', m.role) AS me " +
    'FROM users u JOIN memberships m ON m.user_id = u.id AND m.org_id = $2 ' +
    'JOIN orgs o ON o.id = m.org_id WHERE u.id = $1 AND u.deleted_at IS NULL';

  const app = require('fastify')({
    logger: false,
    https: {
      cert: fs.readFileSync(process.env.TLS_CERT),
      key: fs.readFileSync(process.env.TLS_KEY),
      minVersion: 'TLSv1.3',
    },
    keepAliveTimeout: 60000,
  });

  app.get('/api/v1/me', async (req, reply) => {
    const h = req.headers.authorization || '';
    let claims;
    try {
      if (!h.startsWith('Bearer ')) throw new Error('no token');
      claims = verify(h.slice(7));
    } catch (e) {
      reply.code(401);
      return { error: { code: 'unauthenticated', message: 'invalid or expired credentials' } };
    }
    if (revoked.has(claims.jti) || revoked.has(claims.sid) || !roles.has(claims.role)) {
      reply.code(401);
      return { error: { code: 'unauthenticated', message: 'invalid or expired credentials' } };
    }
    const r = await pool.query({ name: 'me', text: sql, values: [claims.sub, claims.org] });
    if (r.rows.length === 0) {
      reply.code(404);
      return { error: { code: 'not_found', message: 'no such user' } };
    }
    reply.header('Cache-Control', 'no-store');
    return r.rows[0].me;
  });

  app.listen({ port: Number(process.env.PORT || 18445), host: '127.0.0.1' });
}
