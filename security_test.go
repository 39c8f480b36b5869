package storage_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"google.golang.org/grpc"

	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/etcdtest"
	"github.com/snapmeta/storage/testsuite"
)

// The security tests run etcd with TLS, client certificate authentication
// and RBAC (etcdtest.WithTLS, etcdtest.WithAuth): etcd takes the user from
// the CN of the client's certificate, or from the auth token of a client
// configured with Username and Password.

// securityWithin bounds how long a refused operation may take: a refusal is
// an answer, never a wait for a timeout.
const securityWithin = 5 * time.Second

// secureEtcd starts a TLS, client certificate and RBAC enabled etcd for t.
func secureEtcd(t *testing.T) *etcdtest.Cluster {
	t.Helper()
	return etcdtest.Start(t, etcdtest.WithTLS(), etcdtest.WithAuth("root-secret"))
}

// tenants manages users that may read and write under their own roots only,
// through the root client of a secure etcd.
type tenants struct {
	c     *etcdtest.Cluster
	admin *clientv3.Client

	mu      sync.Mutex
	granted map[string]bool // roots granted to some user
}

func newTenants(t *testing.T, c *etcdtest.Cluster) *tenants {
	return &tenants{c: c, admin: c.Client(t), granted: map[string]bool{}}
}

// addUser creates user, with a password if password is not empty (else the
// user logs in only with a certificate whose CN is its name), and its role
// "rw:<user>", which has no permission until grant adds some.
func (ts *tenants) addUser(t testing.TB, user, password string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := ts.admin.UserAddWithOptions(ctx, user, password, &clientv3.UserAddOptions{NoPassword: password == ""})
	require.NoError(t, err, "add user %s", user)
	_, err = ts.admin.RoleAdd(ctx, "rw:"+user)
	require.NoError(t, err, "add role of %s", user)
	_, err = ts.admin.UserGrantRole(ctx, user, "rw:"+user)
	require.NoError(t, err, "grant role of %s", user)
}

// grant gives user read-write access to the keys of the store at root, the
// range [root+"/", prefix end), by adding it to the user's role (one auth
// change, so that opening stores stays cheap). Granting again is harmless.
func (ts *tenants) grant(user, root string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	prefix := root + "/"
	if _, err := ts.admin.RoleGrantPermission(ctx, "rw:"+user, prefix, clientv3.GetPrefixRangeEnd(prefix), clientv3.PermissionType(clientv3.PermReadWrite)); err != nil {
		return fmt.Errorf("grant %s read-write on %q: %w", user, prefix, err)
	}
	ts.mu.Lock()
	ts.granted[root] = true
	ts.mu.Unlock()
	return nil
}

// open opens the store at root as user, who logs in with its certificate.
func (ts *tenants) open(t testing.TB, user, root string, opts ...storage.EtcdOpt) storage.MetaStore {
	t.Helper()
	cfg := ts.c.ClientConfigAs(user)
	ms, err := storage.NewEtcdStore(root, &cfg, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ms.Close() })
	return ms
}

// allKeys returns every key in etcd, read as root.
func (ts *tenants) allKeys(t testing.TB) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := ts.admin.Get(ctx, "\x00", clientv3.WithFromKey(), clientv3.WithKeysOnly())
	require.NoError(t, err)
	keys := make([]string, len(resp.Kvs))
	for i, kv := range resp.Kvs {
		keys[i] = string(kv.Key)
	}
	return keys
}

// assertKeysUnder checks that every key in etcd lies under the layout
// prefix <root>/storage.v1/ of one of roots.
func (ts *tenants) assertKeysUnder(t testing.TB, roots []string) {
	t.Helper()
	keys := ts.allKeys(t)
	require.NotEmpty(t, keys)
	for _, k := range keys {
		assert.True(t, slices.ContainsFunc(roots, func(root string) bool {
			return strings.HasPrefix(k, root+"/"+storage.KeyEtcdVersion+"/")
		}), "key %q lies outside the stores' prefixes", k)
	}
}

// TestRBACConformance runs the conformance suite as a user that may read
// and write only under the roots the suite picks: each open grants the user
// the prefix of that root, and nothing else.
func TestRBACConformance(t *testing.T) {
	c := secureEtcd(t)
	ts := newTenants(t, c)
	ts.addUser(t, "tenant", "")
	testsuite.MetaStoreSuite(t, "etcd-rbac", func(tb testing.TB, root string) (storage.MetaStore, error) {
		if err := ts.grant("tenant", root); err != nil {
			return nil, err
		}
		cfg := c.ClientConfigAs("tenant")
		return storage.NewEtcdStore(root, &cfg)
	})
	ts.mu.Lock()
	roots := make([]string, 0, len(ts.granted))
	for root := range ts.granted {
		roots = append(roots, root)
	}
	ts.mu.Unlock()
	ts.assertKeysUnder(t, roots)
}

// readOps are reads of a store, each in its own read-only transaction.
var readOps = map[string]func(ctx context.Context) error{
	"GetInfo": func(ctx context.Context) error {
		_, _, _, err := storage.GetInfo(ctx, "base")
		return err
	},
	"WalkInfo": func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil })
	},
	"GetSnapshot": func(ctx context.Context) error {
		_, err := storage.GetSnapshot(ctx, "work")
		return err
	},
	"IDMap": func(ctx context.Context) error {
		_, err := storage.IDMap(ctx)
		return err
	},
}

// writeOps are changes of a store; each runs in its own writable
// transaction, which is committed when the operation succeeds.
var writeOps = map[string]func(ctx context.Context) error{
	"CreateSnapshot": func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "intruder", "base")
		return err
	},
	"CreateSnapshot without parent": func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "intruder", "")
		return err
	},
	"UpdateInfo": func(ctx context.Context) error {
		_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "base", Labels: map[string]string{"owned": "yes"}}, "labels")
		return err
	},
	"Remove": func(ctx context.Context) error {
		_, _, err := storage.Remove(ctx, "work")
		return err
	},
}

// runOp runs op in a transaction of ms and returns the first error, from the
// operation or from Commit, and how long it all took.
func runOp(ms storage.MetaStore, writable bool, op func(ctx context.Context) error) (error, time.Duration) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx, tx, err := ms.TransactionContext(ctx, writable)
	if err != nil {
		return err, time.Since(start)
	}
	if err := op(ctx); err != nil {
		_ = tx.Rollback()
		return err, time.Since(start)
	}
	if writable {
		err = tx.Commit()
	} else {
		err = tx.Rollback()
	}
	return err, time.Since(start)
}

// TestRBACOtherRootIsDenied checks that a user confined to its own root can
// neither read nor change another root, and is told so at once with a
// PermissionDenied error.
func TestRBACOtherRootIsDenied(t *testing.T) {
	c := secureEtcd(t)
	ts := newTenants(t, c)
	ts.addUser(t, "tenant", "")
	ts.addUser(t, "reader", "")

	own, victim := "tenants/tenant", "tenants/victim"
	require.NoError(t, ts.grant("tenant", own))
	adminCfg := c.ClientConfig()
	victimStore, err := storage.NewEtcdStore(victim, &adminCfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = victimStore.Close() })
	update(t, victimStore, func(ctx context.Context) error {
		if err := commitLayer(ctx, "base", ""); err != nil {
			return err
		}
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "work", "base")
		return err
	})
	before := ts.allKeys(t)

	// The tenant's own root works.
	mine := ts.open(t, "tenant", own)
	update(t, mine, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })

	theirs := ts.open(t, "tenant", victim)
	for name, op := range readOps {
		t.Run("read/"+name, func(t *testing.T) {
			err, took := runOp(theirs, false, op)
			assert.True(t, errdefs.IsPermissionDenied(err), "got %v", err)
			assert.Less(t, took, securityWithin)
		})
	}
	for name, op := range writeOps {
		t.Run("write/"+name, func(t *testing.T) {
			err, took := runOp(theirs, true, op)
			assert.True(t, errdefs.IsPermissionDenied(err), "got %v", err)
			assert.Less(t, took, securityWithin)
		})
	}

	// A user who may only read the victim's root reads it, and is refused
	// when it writes: by the ID allocator, or by the commit itself.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	prefix := victim + "/"
	_, err = ts.admin.RoleAdd(ctx, "ro:"+victim)
	require.NoError(t, err)
	_, err = ts.admin.RoleGrantPermission(ctx, "ro:"+victim, prefix, clientv3.GetPrefixRangeEnd(prefix), clientv3.PermissionType(clientv3.PermRead))
	require.NoError(t, err)
	_, err = ts.admin.UserGrantRole(ctx, "reader", "ro:"+victim)
	require.NoError(t, err)
	readOnly := ts.open(t, "reader", victim)
	for name, op := range readOps {
		err, _ := runOp(readOnly, false, op)
		assert.NoError(t, err, "reader: %s", name)
	}
	for name, op := range writeOps {
		t.Run("read-only/"+name, func(t *testing.T) {
			err, took := runOp(readOnly, true, op)
			assert.True(t, errdefs.IsPermissionDenied(err), "got %v", err)
			assert.Less(t, took, securityWithin)
		})
	}

	// Nothing changed in the victim's root.
	assert.Equal(t, before, slices.DeleteFunc(ts.allKeys(t), func(k string) bool { return strings.HasPrefix(k, own+"/") }))
	require.NoError(t, victimStore.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		assert.Len(t, ids, 2)
		_, info, _, _ := storage.GetInfo(ctx, "base")
		assert.Empty(t, info.Labels)
		return err
	}))
}

// TestRBACKeyNamesStayUnderTheRoot checks that no snapshot name, however
// shaped like a path, an escape or the layout, lets a store write outside
// its prefix: names that would escape a file system are plain names to etcd,
// and the user's permissions would refuse any key outside its root.
func TestRBACKeyNamesStayUnderTheRoot(t *testing.T) {
	c := secureEtcd(t)
	ts := newTenants(t, c)
	ts.addUser(t, "tenant", "")
	ts.addUser(t, "neighbour", "")
	own, next := "tenants/tenant", "tenants/neighbour"
	require.NoError(t, ts.grant("tenant", own))
	require.NoError(t, ts.grant("neighbour", next))

	names := []string{"../x", "/../../etc", "a/storage.v1/snapshots/b", "\x00", "..%2F", "..", "/", "../../" + next + "/storage.v1/snapshots/base"}
	ms := ts.open(t, "tenant", own)
	// A chain, so that the children index holds every name as a parent too.
	parent := ""
	for i, name := range names {
		update(t, ms, func(ctx context.Context) error {
			if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, fmt.Sprintf("active-%d", i), parent); err != nil {
				return err
			}
			_, err := storage.CommitActive(ctx, fmt.Sprintf("active-%d", i), name, snapshots.Usage{Size: int64(i)})
			return err
		})
		parent = name
	}
	update(t, ms, func(ctx context.Context) error {
		for _, name := range names {
			if _, err := storage.CreateSnapshot(ctx, snapshots.KindView, "view-of-"+name, name); err != nil {
				return err
			}
		}
		return nil
	})

	// Every name reads back as written, with its parent.
	require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		for i, name := range names {
			_, info, usage, err := storage.GetInfo(ctx, name)
			if !assert.NoError(t, err, "%q", name) {
				continue
			}
			assert.Equal(t, name, info.Name)
			assert.Equal(t, snapshots.KindCommitted, info.Kind)
			assert.Equal(t, int64(i), usage.Size)
			if i > 0 {
				assert.Equal(t, names[i-1], info.Parent)
			}
			_, info, _, err = storage.GetInfo(ctx, "view-of-"+name)
			assert.NoError(t, err)
			assert.Equal(t, name, info.Parent)
		}
		var walked []string
		err := storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
			walked = append(walked, info.Name)
			return nil
		})
		assert.Len(t, walked, 2*len(names))
		return err
	}))

	// Every key lies under the tenant's layout prefix, as root sees it.
	ts.assertKeysUnder(t, []string{own})

	// The neighbour sees none of it in its own root, and cannot read the
	// tenant's.
	mine := ts.open(t, "neighbour", next)
	theirs := ts.open(t, "neighbour", own)
	for _, name := range names {
		err, _ := runOp(mine, false, func(ctx context.Context) error {
			_, _, _, err := storage.GetInfo(ctx, name)
			return err
		})
		assert.True(t, errdefs.IsNotFound(err), "%q in the neighbour's root: %v", name, err)
		err, _ = runOp(theirs, false, func(ctx context.Context) error {
			_, _, _, err := storage.GetInfo(ctx, name)
			return err
		})
		assert.True(t, errdefs.IsPermissionDenied(err), "%q in the tenant's root, read by the neighbour: %v", name, err)
	}
}

// TestTLSSecurityRefusesClientsWithoutValidCertificate checks that a store
// whose client has no certificate, or one from another authority, gets an
// error, not a hang. The TLS handshake fails, etcd's client keeps waiting for
// a usable connection (it sends with gRPC's wait-for-ready), and the store's
// request timeout ends the wait: the error is of class Unavailable.
func TestTLSSecurityRefusesClientsWithoutValidCertificate(t *testing.T) {
	c := secureEtcd(t)
	other, err := etcdtest.NewCA("another CA")
	require.NoError(t, err)
	foreign, err := other.ClientCert(etcdtest.RootUser)
	require.NoError(t, err)

	const requestTimeout = time.Second
	for _, tc := range []struct {
		name string
		tls  *tls.Config
	}{
		{"no certificate", &tls.Config{RootCAs: c.CA(), MinVersion: tls.VersionTLS12}},
		{"certificate from another CA", &tls.Config{RootCAs: c.CA(), Certificates: []tls.Certificate{foreign}, MinVersion: tls.VersionTLS12}},
		{"no TLS", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // each waits for its request timeout
			cfg := c.ClientConfig()
			cfg.TLS = tc.tls
			if tc.tls == nil {
				cfg.Endpoints = []string{strings.Replace(c.Endpoint(0), "https://", "http://", 1)}
			}
			start := time.Now()
			ms, err := storage.NewEtcdStore("tenants/victim", &cfg, storage.WithRequestTimeout(requestTimeout))
			if err == nil {
				defer ms.Close()
				err, _ = runOp(ms, false, readOps["GetInfo"])
			}
			took := time.Since(start)
			require.Error(t, err)
			assert.Less(t, took, requestTimeout+securityWithin)
			assert.True(t, errdefs.IsUnavailable(err) || errdefs.IsUnauthorized(err), "got %v", err)
			t.Logf("refused after %v, class %s: %v", took.Round(time.Millisecond), securityErrClass(err), err)
		})
	}
}

// TestSecurityPasswordAuth checks that Username and Password of a
// clientv3.Config reach etcd through NewEtcdStore, and that a wrong password
// is refused with an authentication class.
func TestSecurityPasswordAuth(t *testing.T) {
	c := secureEtcd(t)
	ts := newTenants(t, c)
	ts.addUser(t, "pw-user", "pw-secret")
	ts.addUser(t, "cert-user", "")
	root := "tenants/pw-user"
	require.NoError(t, ts.grant("pw-user", root))

	// The certificate's CN names no user: the token decides.
	cfg := c.ClientConfigAs("nobody")
	cfg.Username, cfg.Password = "pw-user", "pw-secret"
	saved := cfg
	ms, err := storage.NewEtcdStore(root, &cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ms.Close() })
	assert.Equal(t, saved.Username, cfg.Username)
	assert.Equal(t, saved.Password, cfg.Password)
	assert.Same(t, saved.TLS, cfg.TLS)
	assert.Equal(t, saved.Endpoints, cfg.Endpoints)
	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	err, _ = runOp(ms, false, readOps["GetInfo"])
	assert.NoError(t, err)
	// The same user, another root: denied.
	elsewhere, err := storage.NewEtcdStore("tenants/elsewhere", &cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = elsewhere.Close() })
	err, _ = runOp(elsewhere, false, readOps["GetInfo"])
	assert.True(t, errdefs.IsPermissionDenied(err), "got %v", err)

	for _, tc := range []struct{ name, user, password string }{
		{"wrong password", "pw-user", "wrong"},
		{"unknown user", "nobody", "pw-secret"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := c.ClientConfigAs("nobody")
			bad.Username, bad.Password = tc.user, tc.password
			start := time.Now()
			ms, err := storage.NewEtcdStore(root, &bad)
			if err == nil {
				defer ms.Close()
				err, _ = runOp(ms, false, readOps["GetInfo"])
			}
			took := time.Since(start)
			require.Error(t, err)
			assert.Less(t, took, securityWithin)
			assert.True(t, errdefs.IsUnauthorized(err) || errdefs.IsPermissionDenied(err), "got class %s: %v", securityErrClass(err), err)
			t.Logf("refused after %v, class %s: %v", took.Round(time.Millisecond), securityErrClass(err), err)
		})
	}

	// etcd refuses a password for a user that has none with an error it
	// does not translate for gRPC (auth.ErrNoPasswordUser reaches the
	// client as codes.Unknown), so its class is not asserted: only that it
	// is refused, at once.
	t.Run("password for a user without one", func(t *testing.T) {
		bad := c.ClientConfigAs("nobody")
		bad.Username, bad.Password = "cert-user", "anything"
		start := time.Now()
		ms, err := storage.NewEtcdStore(root, &bad)
		if err == nil {
			_ = ms.Close()
		}
		took := time.Since(start)
		require.Error(t, err)
		assert.Less(t, took, securityWithin)
		t.Logf("refused after %v, class %s: %v", took.Round(time.Millisecond), securityErrClass(err), err)
	})
}

// TestSecurityPasswordTokenRenewal checks that a store logged in with a
// password keeps working when its auth token expires and when the auth
// store changes under it (etcd then refuses the old token with
// ErrInvalidAuthToken or ErrAuthOldRevision, and the client logs in again),
// and that a changed password is refused with an authentication class.
func TestSecurityPasswordTokenRenewal(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.WithTLS(), etcdtest.WithAuth("root-secret"),
		etcdtest.WithConfig(func(_ int, cfg *embed.Config) { cfg.AuthTokenTTL = 1 }))
	ts := newTenants(t, c)
	ts.addUser(t, "pw-user", "pw-secret")
	root := "tenants/pw-user"
	require.NoError(t, ts.grant("pw-user", root))
	cfg := c.ClientConfigAs("nobody")
	cfg.Username, cfg.Password = "pw-user", "pw-secret"
	// Count the logins; the store passes DialOptions to the client as given.
	var logins atomic.Int64
	cfg.DialOptions = append(cfg.DialOptions, grpc.WithChainUnaryInterceptor(
		func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			if strings.HasSuffix(method, "/Authenticate") {
				logins.Add(1)
			}
			return invoker(ctx, method, req, reply, cc, opts...)
		}))
	// Without the watch cache: its watch stream may log in on its own.
	ms, err := storage.NewEtcdStore(root, &cfg, storage.WithoutWatchCache())
	require.NoError(t, err)
	t.Cleanup(func() { _ = ms.Close() })
	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "one", "") })
	assert.Equal(t, int64(1), logins.Load())

	// The auth store changes (the client logs in again if etcd finds its
	// token stale).
	require.NoError(t, ts.grant("pw-user", "tenants/other"))
	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "two", "one") })
	before := logins.Load()

	// The token expires (TTL 1s, expired tokens are dropped every second).
	time.Sleep(2100 * time.Millisecond)
	update(t, ms, func(ctx context.Context) error { return commitLayer(ctx, "three", "two") })
	assert.Greater(t, logins.Load(), before, "logged in again after the token expired")
	t.Logf("logins: %d", logins.Load())
	err, _ = runOp(ms, false, readOps["IDMap"])
	assert.NoError(t, err)

	// The password changes, which revokes the user's tokens: the store
	// cannot log in again.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = ts.admin.UserChangePassword(ctx, "pw-user", "new-secret")
	require.NoError(t, err)
	start := time.Now()
	err, took := runOp(ms, false, readOps["IDMap"])
	require.Error(t, err)
	assert.Less(t, time.Since(start), securityWithin)
	assert.True(t, errdefs.IsUnauthorized(err) || errdefs.IsPermissionDenied(err), "got class %s: %v", securityErrClass(err), err)
	t.Logf("old password refused after %v, class %s: %v", took.Round(time.Millisecond), securityErrClass(err), err)
}

// securityErrClass names the errdefs class of err.
func securityErrClass(err error) string {
	for _, c := range []struct {
		name string
		is   func(error) bool
	}{
		{"Unauthenticated", errdefs.IsUnauthorized},
		{"PermissionDenied", errdefs.IsPermissionDenied},
		{"Unavailable", errdefs.IsUnavailable},
		{"InvalidArgument", errdefs.IsInvalidArgument},
		{"FailedPrecondition", errdefs.IsFailedPrecondition},
		{"NotFound", errdefs.IsNotFound},
		{"DeadlineExceeded", errdefs.IsDeadlineExceeded},
		{"Unknown", errdefs.IsUnknown},
	} {
		if c.is(err) {
			return c.name
		}
	}
	return "none"
}
