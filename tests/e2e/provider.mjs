// A certified OpenID provider (the `oidc-provider` package) configured like a strict production
// IdP, for the sidecar's end-to-end tests. Run from the repository root:
//
//   node tests/e2e/provider.mjs '<json config>'     (or the JSON in $E2E_PROVIDER_CONFIG)
//
// Config keys (all optional except clients):
//   port                 listen port on 127.0.0.1; 0 (default) picks a free one
//   access_token_ttl     seconds, default 60
//   refresh_token_ttl    seconds, default 86400
//   id_token_ttl         seconds, default 3600
//   conform_id_token_claims  default true: scope claims (email, profile) only at userinfo
//   clients              [{client_id, client_secret, redirect_uris, post_logout_redirect_uris,
//                          backchannel_logout_uri?}]
//
// When listening it prints one line `READY <issuer>` on stdout. Everything else goes to stderr.
//
// Test-only additions outside the provider's own routes:
//   GET  /interaction/:uid         a login form (no browser needed: tests POST it)
//   POST /interaction/:uid/login   login=<accountId> finishes the login prompt
//   GET  /__test/stats             counters from the provider's events, as JSON
//                                  (refresh_tokens_issued counts rotations too;
//                                  reuse_detections counts rotated refresh tokens presented
//                                  again; access_tokens lists sha256/exp of every one issued;
//                                  id_tokens the signing kid of each one a grant returned)
//   POST /__test/rotate-keys       signing-key rotation: a new key set (new kids) replaces the
//                                  old one in the JWKS and signs from now on; answers the kids
//   POST /__test/outage?mode=M     token endpoint outage: M=503 answers 503 without looking at
//                                  the request, M=reset drops the connection unanswered, M=off
//                                  ends it; either way no grant is processed (token_outage_hits;
//                                  token_outage_times: when each refused request came, Unix s)
//   POST /__test/slow?seconds=N    the token endpoint processes each request at once (a refresh
//                                  grant rotates) but holds its answer back N seconds; 0 ends
//                                  it (slow_token_answers). A client that dies meanwhile has
//                                  lost the rotated tokens: the dead-lock-holder tests use it
//   POST /__test/refresh-grace?seconds=N  a rotated refresh token is accepted again for N
//                                  seconds after its first use, like Okta's grace period (30 s by
//                                  default), Auth0's rotation overlap or Keycloak's max reuse;
//                                  reuse after that is detected as before (refresh_grace_reuses);
//                                  0 ends it
//
// Key rotation builds a new Provider instance on the same server and issuer with the same
// cookie keys and the same adapter store: oidc-provider reads `jwks` only at construction, so
// this is how a new key set gets in, while sessions, grants and tokens carry over.
//
// Consent is pre-granted (a first-party client): `loadExistingGrant` grants every requested
// scope, so no consent screen appears; a request with prompt=consent gets its consent
// interaction finished without a screen. Every code grant yields a refresh token (see
// issueRefreshToken below); refresh tokens rotate on every use, and presenting a rotated one
// again revokes the whole grant (oidc-provider's reuse detection).

import * as crypto from 'node:crypto';
import * as http from 'node:http';

import Provider from 'oidc-provider';
// oidc-provider's own in-memory adapter, made once so every Provider instance built here (key
// rotation builds a new one) shares its store. The package has no `exports` map.
import { createMemoryAdapter } from 'oidc-provider/lib/adapters/memory_adapter.js';

// stdout carries only the READY line (the test reads it through a pipe); notices go to stderr.
console.log = console.error;
console.info = console.error;

const HOST = '127.0.0.1';
const MAX_BODY = 16 * 1024;

function loadConfig() {
  const raw = process.argv[2] ?? process.env.E2E_PROVIDER_CONFIG;
  if (!raw) {
    throw new Error('usage: node provider.mjs \'<json config>\' (or set E2E_PROVIDER_CONFIG)');
  }
  const config = JSON.parse(raw);
  if (!Array.isArray(config.clients) || config.clients.length === 0) {
    throw new Error('config.clients: at least one client is required');
  }
  return config;
}

const ACCOUNTS = {
  alice: {
    email: 'alice@example.com', name: 'Alice Example', groups: ['admins', 'users'],
  },
  bob: {
    email: 'bob@example.com', name: 'Bob Example', groups: ['users'],
  },
};

async function findAccount(_ctx, id) {
  const account = Object.hasOwn(ACCOUNTS, id) ? ACCOUNTS[id] : undefined;
  if (!account) {
    return undefined;
  }
  return {
    accountId: id,
    async claims() {
      return {
        sub: id,
        email: account.email,
        email_verified: true,
        name: account.name,
        groups: account.groups,
      };
    },
  };
}

// A first-party client: every scope and claim it asks for counts as consented. The grant is
// saved here so the `consent` prompt never fires.
async function loadExistingGrant(ctx) {
  const { oidc } = ctx;
  const grantId = oidc.result?.consent?.grantId || oidc.session.grantIdFor(oidc.client.clientId);
  let grant = grantId ? await oidc.provider.Grant.find(grantId) : undefined;
  if (!grant) {
    grant = new oidc.provider.Grant({
      accountId: oidc.account.accountId,
      clientId: oidc.client.clientId,
    });
  }
  grant.addOIDCScope(oidc.requestParamOIDCScopes);
  grant.addOIDCClaims(oidc.requestParamClaims);
  await grant.save();
  return grant;
}

function signingKeys() {
  const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  return {
    keys: [
      { ...rsa.privateKey.export({ format: 'jwk' }), kid: `rsa-${crypto.randomUUID()}`, use: 'sig', alg: 'RS256' },
      { ...ec.privateKey.export({ format: 'jwk' }), kid: `ec-${crypto.randomUUID()}`, use: 'sig', alg: 'ES256' },
    ],
  };
}

const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(title, body) {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head><body>${body}</body></html>`;
}

const stats = {
  authorizations: 0,
  logins: [],
  consents: 0,
  grants: {},
  grant_errors: {},
  refresh_tokens_issued: 0,
  refresh_token_grants: [],
  refresh_tokens_consumed: 0,
  refresh_tokens_destroyed: 0,
  revocations: 0,
  revocation_errors: 0,
  revoked_grants: [],
  userinfo_errors: 0,
  end_sessions: 0,
  backchannel_success: 0,
  backchannel_errors: [],
  server_errors: [],
  reuse_detections: 0,
  refresh_grant_errors: [],
  access_tokens: [],
  id_tokens: [],
  jwks_requests: 0,
  key_rotations: 0,
  token_outage_hits: 0,
  token_outage_times: [],
  slow_token_answers: 0,
  refresh_grace_reuses: 0,
  signing_kids: [],
};

function count(map, key) {
  map[key] = (map[key] || 0) + 1;
}

// The token value of an opaque access token is its jti; tests get only a hash of it.
const sha256 = (value) => crypto.createHash('sha256').update(value).digest('hex');

// Seconds, set through POST /__test/slow and /__test/refresh-grace.
const testModes = { tokenDelay: 0, refreshGrace: 0 };

// Koa middleware: the token endpoint's answer is held back after the grant was processed.
async function slowTokenAnswers(ctx, next) {
  const delay = testModes.tokenDelay;
  await next();
  if (delay > 0 && ctx.path === '/token') {
    stats.slow_token_answers += 1;
    await new Promise((resolve) => { setTimeout(resolve, delay * 1000); });
  }
}

// The grace window of IdPs that accept the previous refresh token for a while: a refresh
// token consumed (rotated) less than testModes.refreshGrace seconds ago is found unconsumed,
// so oidc-provider rotates it again instead of revoking the grant. Its first use starts the
// window; a use within it does not extend it.
function withRefreshGrace(adapterFor) {
  return (model) => {
    const adapter = adapterFor(model);
    if (model !== 'RefreshToken') return adapter;
    const find = adapter.find.bind(adapter);
    const consume = adapter.consume.bind(adapter);
    adapter.find = async (id) => {
      const payload = await find(id);
      const age = Math.floor(Date.now() / 1000) - (payload?.consumed ?? 0);
      if (payload?.consumed && age < testModes.refreshGrace) {
        stats.refresh_grace_reuses += 1;
        const { consumed: _consumed, ...unconsumed } = payload;
        return unconsumed;
      }
      return payload;
    };
    adapter.consume = async (id) => {
      if (!(await find(id))?.consumed) await consume(id);
    };
    return adapter;
  };
}

function buildProvider(issuer, config, jwks, cookieKeys, adapter) {
  const accessTtl = Number(config.access_token_ttl ?? 60);
  const refreshTtl = Number(config.refresh_token_ttl ?? 86400);
  const idTokenTtl = Number(config.id_token_ttl ?? 3600);

  const clients = config.clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    redirect_uris: c.redirect_uris,
    post_logout_redirect_uris: c.post_logout_redirect_uris ?? [],
    ...(c.backchannel_logout_uri ? {
      backchannel_logout_uri: c.backchannel_logout_uri,
      backchannel_logout_session_required: true,
    } : {}),
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: 'RS256',
  }));

  const provider = new Provider(issuer, {
    clients,
    jwks,
    adapter,
    cookies: { keys: cookieKeys },
    findAccount,
    loadExistingGrant,
    scopes: ['openid', 'email', 'profile', 'offline_access'],
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'groups'],
    },
    conformIdTokenClaims: config.conform_id_token_claims ?? true,
    responseTypes: ['code'],
    clientAuthMethods: ['client_secret_basic', 'client_secret_post'],
    allowOmittingSingleRegisteredRedirectUri: false,
    pkce: { required: () => true },
    rotateRefreshToken: true,
    // oidc-provider drops `offline_access` unless the request says prompt=consent (OIDC Core
    // §11), and by default issues refresh tokens only with it. Like most production IdPs, this
    // one gives every code grant of a client allowed the refresh_token grant a refresh token;
    // without a granted offline_access it ends with the IdP session (expiresWithSession).
    issueRefreshToken: async (_ctx, client, code) => (
      client.grantTypeAllowed('refresh_token') && code.kind === 'AuthorizationCode'
    ),
    ttl: {
      AccessToken: accessTtl,
      AuthorizationCode: 60,
      IdToken: idTokenTtl,
      RefreshToken: refreshTtl,
      Interaction: 600,
      Session: 86400,
      Grant: Math.max(refreshTtl, 86400),
    },
    interactions: { url: async (_ctx, interaction) => `/interaction/${interaction.uid}` },
    features: {
      devInteractions: { enabled: false },
      revocation: { enabled: true },
      introspection: { enabled: true },
      userinfo: { enabled: true },
      backchannelLogout: { enabled: true },
      rpInitiatedLogout: {
        enabled: true,
        // The confirmation page submits itself; tests POST the form with logout=yes.
        async logoutSource(ctx, form) {
          ctx.body = page('Sign out', `${form.replace('</form>', '<input type="hidden" name="logout" value="yes"/></form>')}
<script>document.getElementById('op.logoutForm').submit()</script>`);
        },
        async postLogoutSuccessSource(ctx) {
          ctx.body = page('Signed out', '<h1>Signed out</h1>');
        },
      },
    },
    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Error', Object.entries(out)
        .map(([k, v]) => `<p><b>${escapeHtml(k)}</b>: <code>${escapeHtml(v)}</code></p>`).join(''));
    },
    // Back-channel logout tokens go to the sidecar on 127.0.0.1, which the default SSRF guard
    // refuses (special-use address). Test-only: drop the guard for loopback targets.
    fetch(url, options) {
      if (new URL(url).hostname === HOST) {
        delete options.dispatcher;
      }
      return globalThis.fetch(url, options);
    },
  });

  provider.on('authorization.success', () => { stats.authorizations += 1; });
  provider.on('grant.success', (ctx) => {
    const grantType = ctx.oidc.params.grant_type;
    count(stats.grants, grantType);
    const idToken = ctx.body?.id_token;
    if (idToken) {
      const header = JSON.parse(Buffer.from(idToken.split('.')[0], 'base64url').toString());
      stats.id_tokens.push({ grant_type: grantType, kid: header.kid });
    }
  });
  provider.on('grant.error', (ctx, err) => {
    count(stats.grant_errors, err.error ?? err.message);
    if (ctx.oidc.params?.grant_type === 'refresh_token') {
      // The response says only 'grant request is invalid'; the reason is in error_detail.
      const detail = err.error_detail ?? err.error_description ?? err.message;
      stats.refresh_grant_errors.push(detail);
      // oidc-provider's reuse detection: a consumed (rotated) refresh token came back, and
      // the whole grant was revoked (lib/actions/grants/refresh_token.js).
      if (detail === 'refresh token already used') stats.reuse_detections += 1;
    }
  });
  provider.on('access_token.saved', (token) => {
    // Same arithmetic as the opaque format's payload (epochTime() + expiration).
    stats.access_tokens.push({
      sha256: sha256(token.jti),
      exp: Math.floor(Date.now() / 1000) + token.expiration,
      grant_id: token.grantId,
    });
  });
  provider.on('refresh_token.saved', (token) => {
    stats.refresh_tokens_issued += 1;
    stats.refresh_token_grants.push({ grant_id: token.grantId, account_id: token.accountId });
  });
  provider.on('refresh_token.consumed', () => { stats.refresh_tokens_consumed += 1; });
  provider.on('refresh_token.destroyed', () => { stats.refresh_tokens_destroyed += 1; });
  provider.on('grant.revoked', (ctx, grantId) => {
    const { route, entities } = ctx.oidc;
    // At the revocation endpoint, the token presented (RFC 7009) is an entity of the request.
    const token = entities.RefreshToken ?? entities.AccessToken;
    if (route === 'revocation') stats.revocations += 1;
    stats.revoked_grants.push({
      grant_id: grantId,
      route,
      token_kind: route === 'revocation' ? token?.kind ?? null : null,
      account_id: token?.accountId ?? null,
    });
  });
  provider.on('revocation.error', () => { stats.revocation_errors += 1; });
  provider.on('userinfo.error', () => { stats.userinfo_errors += 1; });
  provider.on('end_session.success', () => { stats.end_sessions += 1; });
  provider.on('backchannel.success', () => { stats.backchannel_success += 1; });
  provider.on('backchannel.error', (_ctx, err) => stats.backchannel_errors.push(String(err.message)));
  provider.on('server_error', (_ctx, err) => {
    stats.server_errors.push(String(err.stack ?? err));
    console.error('server_error', err);
  });
  return provider;
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    let size = 0;
    const chunks = [];
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY) {
        reject(new Error('body too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function send(res, status, body, type = 'text/html; charset=utf-8') {
  res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-store' });
  res.end(body);
}

function loginForm(uid, message = '') {
  return page('Log in', `<h1>Log in</h1>${message ? `<p>${escapeHtml(message)}</p>` : ''}
<form method="post" action="/interaction/${escapeHtml(uid)}/login">
<input name="login" autofocus> <button type="submit">Log in</button></form>`);
}

async function interaction(provider, req, res, uid, action) {
  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (err) {
    send(res, 400, page('Error', `<p>${escapeHtml(err.error ?? err.message)}</p>`));
    return;
  }
  if (details.uid !== uid) {
    send(res, 400, page('Error', '<p>interaction mismatch</p>'));
    return;
  }
  if (details.prompt.name === 'consent') {
    // Only when the client asks for it (prompt=consent): a first-party client is always
    // granted what it asks for, so consent finishes without a screen.
    const { Grant } = provider;
    const grant = details.grantId ? await Grant.find(details.grantId) : new Grant({
      accountId: details.session.accountId,
      clientId: details.params.client_id,
    });
    grant.addOIDCScope(details.params.scope ?? 'openid');
    const grantId = await grant.save();
    stats.consents += 1;
    await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    return;
  }
  if (details.prompt.name !== 'login') {
    send(res, 500, page('Error', `<p>unexpected prompt ${escapeHtml(details.prompt.name)}</p>`));
    return;
  }
  if (action === undefined && req.method === 'GET') {
    send(res, 200, loginForm(uid));
    return;
  }
  if (action !== 'login' || req.method !== 'POST') {
    send(res, 405, page('Error', '<p>method not allowed</p>'));
    return;
  }
  const form = new URLSearchParams(await readBody(req));
  const accountId = form.get('login') ?? '';
  if (!Object.hasOwn(ACCOUNTS, accountId)) {
    send(res, 401, loginForm(uid, 'unknown user'));
    return;
  }
  stats.logins.push(accountId);
  await provider.interactionFinished(
    req,
    res,
    { login: { accountId } },
    { mergeWithLastSubmission: false },
  );
}

async function main() {
  const config = loadConfig();
  let handler = (_req, res) => send(res, 503, 'starting');
  const server = http.createServer((req, res) => {
    Promise.resolve(handler(req, res)).catch((err) => {
      console.error(err);
      if (!res.headersSent) send(res, 500, 'internal error', 'text/plain');
      else res.destroy();
    });
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(Number(config.port ?? 0), HOST, resolve);
  });
  const issuer = `http://${HOST}:${server.address().port}`;
  const cookieKeys = [crypto.randomBytes(32).toString('base64url')];
  const adapter = withRefreshGrace(createMemoryAdapter());
  let provider;
  let callback;
  const install = () => {
    const jwks = signingKeys();
    stats.signing_kids = jwks.keys.map((k) => k.kid);
    provider = buildProvider(issuer, config, jwks, cookieKeys, adapter);
    provider.use(slowTokenAnswers);
    callback = provider.callback();
  };
  install();
  let outage = null;

  handler = async (req, res) => {
    const { pathname } = new URL(req.url, issuer);
    if (pathname === '/__test/stats' && req.method === 'GET') {
      send(res, 200, JSON.stringify(stats), 'application/json');
      return;
    }
    if (pathname === '/__test/rotate-keys' && req.method === 'POST') {
      install();
      stats.key_rotations += 1;
      send(res, 200, JSON.stringify({ kids: stats.signing_kids }), 'application/json');
      return;
    }
    if ((pathname === '/__test/slow' || pathname === '/__test/refresh-grace') && req.method === 'POST') {
      const seconds = Number(new URL(req.url, issuer).searchParams.get('seconds'));
      if (!Number.isFinite(seconds) || seconds < 0) {
        send(res, 400, 'seconds: a number >= 0', 'text/plain');
        return;
      }
      testModes[pathname === '/__test/slow' ? 'tokenDelay' : 'refreshGrace'] = seconds;
      send(res, 200, JSON.stringify(testModes), 'application/json');
      return;
    }
    if (pathname === '/__test/outage' && req.method === 'POST') {
      const mode = new URL(req.url, issuer).searchParams.get('mode');
      if (!['503', 'reset', 'off'].includes(mode)) {
        send(res, 400, 'mode: 503, reset or off', 'text/plain');
        return;
      }
      outage = mode === 'off' ? null : mode;
      send(res, 200, JSON.stringify({ outage }), 'application/json');
      return;
    }
    if (outage && pathname === '/token') {
      stats.token_outage_hits += 1;
      stats.token_outage_times.push(Date.now() / 1000);
      if (outage === 'reset') {
        req.socket.destroy();
      } else {
        res.writeHead(503, { 'Content-Type': 'text/plain', 'Retry-After': '1' });
        res.end('token endpoint unavailable');
      }
      return;
    }
    if (pathname === '/jwks') stats.jwks_requests += 1;
    const match = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login))?$/.exec(pathname);
    if (match) {
      await interaction(provider, req, res, match[1], match[2]);
      return;
    }
    callback(req, res);
  };

  const stop = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  process.stdout.write(`READY ${issuer}\n`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
