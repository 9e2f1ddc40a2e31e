// A real OpenID Connect provider for Postern's OIDC tests: the npm package
// `oidc-provider` (OpenID Certified), configured with test clients, test
// users carrying a `groups` claim, the device flow, and its development
// interactions (a login form that accepts any password and a consent form).
//
// Started by tests/support/oidc.rs as `node provider.mjs`. It listens on a
// random free port on 127.0.0.1 and, once ready, prints exactly one line of
// JSON on stdout: {"issuer": "...", "kid": "..."} (kid: the key id it signs
// ID tokens with). Everything else goes to stderr. It exits when its stdin
// closes, so it never outlives the test process that started it.
//
// Test-only administration, on the same port, plain HTTP, loopback only:
//   POST /test-admin/disable?account=alice   the account no longer exists for
//                                            the provider: logins and refresh
//                                            tokens of that user are refused
//   POST /test-admin/enable?account=alice    undoes it
//
// Nothing here is suitable for production: keys live in memory, the cookie
// keys are constants, and the development interactions accept any password.

import { createPrivateKey, generateKeyPairSync, randomUUID } from 'node:crypto';
import http from 'node:http';
import process from 'node:process';

import Provider from 'oidc-provider';

// stdout carries the ready line only; oidc-provider's notices (console.log,
// console.info) go to stderr with everything else.
console.log = console.error;
console.info = console.error;

// The public client Postern uses in the tests: a native app (RFC 8252) with
// PKCE and no secret; any port on the loopback redirect is accepted.
const PUBLIC_CLIENT = {
  client_id: 'postern-test',
  application_type: 'native',
  token_endpoint_auth_method: 'none',
  redirect_uris: ['http://127.0.0.1/callback'],
  response_types: ['code'],
  grant_types: [
    'authorization_code',
    'refresh_token',
    'urn:ietf:params:oauth:grant-type:device_code',
  ],
};

// Another registered application at the same provider, confidential (it has
// a secret). Its ID tokens carry its own client id as audience, so they must
// be refused by a verifier configured for `postern-test`.
const CONFIDENTIAL_CLIENT = {
  client_id: 'other-app',
  client_secret: 'other-app-secret',
  application_type: 'native',
  token_endpoint_auth_method: 'client_secret_basic',
  redirect_uris: ['http://127.0.0.1/callback'],
  response_types: ['code'],
  grant_types: ['authorization_code', 'refresh_token'],
};

// Test users. The development login form accepts any password; the login
// name is the account id (`sub`).
const ACCOUNTS = new Map([
  ['alice', {
    email: 'alice@example.com',
    email_verified: true,
    name: 'Alice Analyst',
    preferred_username: 'alice',
    groups: ['analysts', 'oncall'],
    team: 'analytics',
  }],
  ['bob', {
    email: 'bob@example.org',
    email_verified: true,
    name: 'Bob Builder',
    preferred_username: 'bob',
    groups: ['engineers'],
    team: 'platform',
  }],
  // An address the provider never verified: it must not name her.
  ['carol', {
    email: 'ceo@example.com',
    email_verified: false,
    name: 'Carol Claimant',
    preferred_username: 'carol',
    groups: ['analysts'],
    team: 'sales',
  }],
]);
const disabled = new Set();

async function findAccount(_ctx, sub) {
  const claims = ACCOUNTS.get(sub);
  if (!claims || disabled.has(sub)) {
    return undefined;
  }
  return {
    accountId: sub,
    async claims() {
      return { sub, ...claims };
    },
  };
}

// The key comes out as PEM and is re-imported before the JWK export: on
// Node.js 20, exporting the KeyObject that generateKeyPairSync returns can
// deadlock when a garbage collection finalizes the key generation job
// during the export (seen here about once in 20 starts).
const { privateKey: pem } = generateKeyPairSync('rsa', {
  modulusLength: 2048,
  publicKeyEncoding: { type: 'spki', format: 'pem' },
  privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
});
const kid = `test-${randomUUID()}`;
const signingKey = { ...createPrivateKey(pem).export({ format: 'jwk' }), kid, use: 'sig', alg: 'RS256' };

const configuration = {
  clients: [PUBLIC_CLIENT, CONFIDENTIAL_CLIENT],
  jwks: { keys: [signingKey] },
  findAccount,
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups', 'team'],
  },
  // Put the claims of the granted scopes into the ID token itself (as most
  // enterprise providers do for groups), not only into the userinfo response.
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    revocation: { enabled: true },
  },
  cookies: { keys: ['postern-test-cookie-key-not-secret'] },
  ttl: {
    AccessToken: 600,
    AuthorizationCode: 60,
    DeviceCode: 600,
    IdToken: 600,
    RefreshToken: 3600,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
  },
};

function admin(req, res, url) {
  const account = url.searchParams.get('account') ?? '';
  const reply = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  if (req.method !== 'POST') {
    return reply(405, { error: 'use POST' });
  }
  if (!ACCOUNTS.has(account)) {
    return reply(404, { error: `no account ${JSON.stringify(account)}` });
  }
  switch (url.pathname) {
    case '/test-admin/disable':
      disabled.add(account);
      return reply(200, { account, disabled: true });
    case '/test-admin/enable':
      disabled.delete(account);
      return reply(200, { account, disabled: false });
    default:
      return reply(404, { error: 'unknown admin endpoint' });
  }
}

const server = http.createServer();
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, configuration);
  provider.on('server_error', (_ctx, err) => console.error('server_error', err));
  const callback = provider.callback();
  server.on('request', (req, res) => {
    const url = new URL(req.url, issuer);
    if (url.pathname.startsWith('/test-admin/')) {
      admin(req, res, url);
    } else {
      callback(req, res);
    }
  });
  process.stdout.write(`${JSON.stringify({ issuer, kid })}\n`);
});

// Exit with the test process: it holds our stdin open and never writes.
process.stdin.on('end', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
process.stdin.resume();
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
