package storage_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/snapmeta/storage"
)

// This file proves the scoping of host-scoped roots (issue 13): which
// roots accept which stores, that scopes never see each other while IDs
// stay unique across the root, and the liveness and fencing of a host's
// lease.

// rootKeys returns every key of root's layout, relative to its prefix.
func rootKeys(t testing.TB, root string) []string {
	t.Helper()
	cli := etcdServer(t).Client(t)
	prefix := root + "/" + storage.KeyEtcdVersion + "/"
	resp, err := cli.Get(context.Background(), prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	require.NoError(t, err)
	var keys []string
	for _, kv := range resp.Kvs {
		keys = append(keys, strings.TrimPrefix(string(kv.Key), prefix))
	}
	return keys
}

// openHost opens host's scope of root and returns the error, closing the
// store at the end of the test when it opened.
func openHost(t testing.TB, root string, opts ...storage.EtcdOpt) (storage.MetaStore, error) {
	t.Helper()
	cfg := etcdServer(t).ClientConfig()
	ms, err := storage.NewEtcdStore(root, &cfg, opts...)
	if err == nil {
		t.Cleanup(func() { _ = ms.Close() })
	}
	return ms, err
}

func createActive(ctx context.Context, key, parent string, labels map[string]string) (storage.Snapshot, error) {
	return storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent, snapshots.WithLabels(labels))
}

func TestEtcdHostRootWithUnscopedSnapshotsRefusesAHost(t *testing.T) {
	root := uniqueRoot(t)
	plain := openEtcd(t, root)
	update(t, plain, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	before := rootKeys(t, root)

	for _, opt := range []storage.EtcdOpt{storage.WithHost("a"), storage.WithHostView("a")} {
		ms, err := openHost(t, root, opt)
		assert.Nil(t, ms)
		require.ErrorIs(t, err, storage.ErrScopeMismatch)
		assert.True(t, errdefs.IsFailedPrecondition(err), "class: %v", err)
	}
	assert.Equal(t, before, rootKeys(t, root), "nothing is written: no mode key, no host, no lock")
	assert.NotContains(t, rootKeys(t, root), storage.KeyEtcdMode)
	update(t, plain, func(ctx context.Context) error { return commitLayer(ctx, "more", "base") })
}

func TestEtcdHostViewOfAnUnscopedEmptyRootIsRefused(t *testing.T) {
	root := uniqueRoot(t)
	ms, err := openHost(t, root, storage.WithHostView("a"))
	assert.Nil(t, ms)
	require.ErrorIs(t, err, storage.ErrScopeMismatch)
	assert.Empty(t, rootKeys(t, root), "a view makes no root host-scoped")

	// A store without host still opens it as a plain root afterwards.
	plain := openEtcd(t, root)
	update(t, plain, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
}

func TestEtcdHostScopedRootRefusesAStoreWithoutHost(t *testing.T) {
	root := uniqueRoot(t)
	a := hostStore(t, root, "a")
	update(t, a, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	assert.Contains(t, rootKeys(t, root), storage.KeyEtcdMode)
	before := rootKeys(t, root)

	plain := openEtcd(t, root) // opening costs no round trip: the first transaction checks
	for _, writable := range []bool{false, true} {
		err := plain.WithTransaction(context.Background(), writable, func(ctx context.Context) error {
			return commitLayer(ctx, "sneaked", "")
		})
		require.ErrorIs(t, err, storage.ErrScopeMismatch, "writable=%v", writable)
		assert.True(t, errdefs.IsFailedPrecondition(err))
		_, _, err = plain.TransactionContext(context.Background(), writable)
		require.ErrorIs(t, err, storage.ErrScopeMismatch, "TransactionContext writable=%v", writable)
	}
	assert.Equal(t, before, rootKeys(t, root), "nothing is written")

	// An operator's view opens the scope of a host that is alive.
	view, err := openHost(t, root, storage.WithHostView("a"))
	require.NoError(t, err)
	require.NoError(t, view.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		_, _, _, err := storage.GetInfo(ctx, "base")
		return err
	}))
}

func TestEtcdHostBadIdentitiesAreInvalidArguments(t *testing.T) {
	root := uniqueRoot(t)
	a := hostStore(t, root, "a")
	for _, tc := range []struct {
		name, host string
	}{
		{"empty", ""},
		{"too long", strings.Repeat("h", 129)},
		{"slash", "a/b"},
		{"parent path", "../a"},
		{"space", "a b"},
		{"NUL", "a\x00"},
		{"non-ASCII", "hôte"},
		{"percent", "a%2F"},
		{"newline", "a\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, opt := range []storage.EtcdOpt{storage.WithHost(tc.host), storage.WithHostView(tc.host)} {
				ms, err := openHost(t, uniqueRoot(t), opt)
				assert.Nil(t, ms)
				assert.True(t, errdefs.IsInvalidArgument(err), "open: %v", err)
			}
			err := a.WithTransaction(context.Background(), true, func(ctx context.Context) error {
				_, err := storage.GetActiveSnapshot(ctx, tc.host, "x")
				assert.True(t, errdefs.IsInvalidArgument(err), "GetActiveSnapshot: %v", err)
				_, err = storage.TakeOver(ctx, tc.host, "x", "y", "")
				assert.True(t, errdefs.IsInvalidArgument(err), "TakeOver: %v", err)
				_, err = storage.ForceTakeOver(ctx, tc.host, "x", "y", "")
				assert.True(t, errdefs.IsInvalidArgument(err), "ForceTakeOver: %v", err)
				return nil
			})
			require.NoError(t, err)
		})
	}
	t.Run("longest and every allowed character", func(t *testing.T) {
		for _, host := range []string{strings.Repeat("h", 128), "Host-1.example_com:7", ".."} {
			ms, err := openHost(t, uniqueRoot(t), storage.WithHost(host))
			require.NoError(t, err, "host %q", host)
			require.NoError(t, ms.Close())
		}
	})
	t.Run("TTL under a second", func(t *testing.T) {
		ms, err := openHost(t, uniqueRoot(t), storage.WithHost("a"), storage.WithHostTTL(500*time.Millisecond))
		assert.Nil(t, ms)
		assert.True(t, errdefs.IsInvalidArgument(err), "%v", err)
	})
}

func TestEtcdHostScopesSeeOnlyTheirOwnNames(t *testing.T) {
	root := uniqueRoot(t)
	a, b := hostStore(t, root, "a"), hostStore(t, root, "b")
	ids := map[string]string{}
	update(t, a, func(ctx context.Context) error {
		if err := commitLayer(ctx, "a-base", ""); err != nil {
			return err
		}
		s, err := createActive(ctx, "same", "a-base", map[string]string{"owner": "a"})
		ids["a/same"] = s.ID
		return err
	})
	update(t, b, func(ctx context.Context) error {
		if err := commitLayer(ctx, "b-base", ""); err != nil {
			return err
		}
		s, err := createActive(ctx, "same", "", map[string]string{"owner": "b"})
		ids["b/same"] = s.ID
		return err
	})
	assert.NotEqual(t, ids["a/same"], ids["b/same"], "one name in two scopes, two IDs")

	for _, tc := range []struct {
		ms          storage.MetaStore
		own, other  string
		owner       string
		wantWalked  []string
		otherParent string
	}{
		{a, "a-base", "b-base", "a", []string{"a-base", "same"}, "a-base"},
		{b, "b-base", "a-base", "b", []string{"b-base", "same"}, ""},
	} {
		require.NoError(t, tc.ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
			var walked []string
			require.NoError(t, storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
				walked = append(walked, info.Name)
				return nil
			}))
			assert.Equal(t, tc.wantWalked, walked, "host %s walks its own names only", tc.owner)
			m, err := storage.IDMap(ctx)
			require.NoError(t, err)
			assert.Len(t, m, 2)
			assert.Equal(t, "same", m[ids[tc.owner+"/same"]])
			assert.NotContains(t, m, ids[map[string]string{"a": "b", "b": "a"}[tc.owner]+"/same"])
			_, info, _, err := storage.GetInfo(ctx, "same")
			require.NoError(t, err)
			assert.Equal(t, tc.owner, info.Labels["owner"])
			assert.Equal(t, tc.otherParent, info.Parent)
			_, _, _, err = storage.GetInfo(ctx, tc.other)
			assert.True(t, errdefs.IsNotFound(err), "GetInfo of the other host's name: %v", err)
			_, err = storage.GetSnapshot(ctx, tc.other)
			assert.True(t, errdefs.IsNotFound(err), "GetSnapshot of the other host's name: %v", err)
			return nil
		}))
		err := tc.ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			_, _, err := storage.Remove(ctx, tc.other)
			return err
		})
		assert.True(t, errdefs.IsNotFound(err), "Remove of the other host's name: %v", err)
		err = tc.ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
			_, err := createActive(ctx, "child", tc.other, nil)
			return err
		})
		assert.True(t, errdefs.IsNotFound(err), "a parent of the other host's scope: %v", err)
	}
	// Each host removes its own "same"; the other's stays.
	update(t, a, func(ctx context.Context) error { _, _, err := storage.Remove(ctx, "same"); return err })
	require.NoError(t, b.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		id, _, _, err := storage.GetInfo(ctx, "same")
		assert.Equal(t, ids["b/same"], id)
		return err
	}))
	requireClean(t, a)
}

func TestEtcdHostIDsAreUniqueAcrossScopes(t *testing.T) {
	root := uniqueRoot(t)
	a, b := hostStore(t, root, "a"), hostStore(t, root, "b")
	// Views of the same scopes have allocators of their own.
	va, err := openHost(t, root, storage.WithHostView("a"))
	require.NoError(t, err)
	vb, err := openHost(t, root, storage.WithHostView("b"))
	require.NoError(t, err)
	stores := []storage.MetaStore{a, b, va, vb}
	const workers, creates = 3, 60
	var wg sync.WaitGroup
	errs := make(chan error, len(stores)*workers)
	for s, ms := range stores {
		for w := range workers {
			wg.Go(func() {
				for i := range creates {
					key := fmt.Sprintf("s%d-w%d-%d", s, w, i)
					err := ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
						_, err := createActive(ctx, key, "", nil)
						return err
					})
					if err != nil {
						errs <- fmt.Errorf("%s: %w", key, err)
						return
					}
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	owner := map[string]string{}
	for _, ms := range []storage.MetaStore{a, b} {
		require.NoError(t, ms.WithTransaction(context.Background(), false, func(ctx context.Context) error {
			m, err := storage.IDMap(ctx)
			require.NoError(t, err)
			assert.Len(t, m, 2*workers*creates, "each host holds what it and its view created")
			for id, name := range m {
				if prev, dup := owner[id]; dup {
					t.Errorf("ID %s is held by %q and %q", id, prev, name)
				}
				owner[id] = name
			}
			return nil
		}))
	}
	assert.Len(t, owner, len(stores)*workers*creates)
	requireClean(t, a)
}

func TestEtcdHostSecondOpenOfALiveHostIsRefused(t *testing.T) {
	root := uniqueRoot(t)
	a := hostStore(t, root, "a")
	update(t, a, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	before := rootKeys(t, root)
	for range 3 {
		ms, err := openHost(t, root, storage.WithHost("a"), storage.WithHostTTL(2*time.Second))
		assert.Nil(t, ms)
		require.ErrorIs(t, err, storage.ErrHostAlive)
		assert.True(t, errdefs.IsFailedPrecondition(err))
	}
	assert.Equal(t, before, rootKeys(t, root))
	// The refused opens left the live store's lease alone.
	update(t, a, func(ctx context.Context) error { return commitLayer(ctx, "after", "base") })

	require.NoError(t, a.Close())
	again, err := openHost(t, root, storage.WithHost("a"))
	require.NoError(t, err, "a closed store releases its host at once")
	require.NoError(t, again.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		_, _, _, err := storage.GetInfo(ctx, "after")
		if err != nil {
			return err
		}
		return commitLayer(ctx, "third", "after")
	}))
}

// hostInfo returns what ListHosts says of host.
func hostInfo(t testing.TB, root, host string) (storage.HostInfo, bool) {
	t.Helper()
	cli := etcdServer(t).Client(t)
	hosts, ok, err := storage.ListHosts(context.Background(), cli, root)
	require.NoError(t, err)
	require.True(t, ok, "root %q is host-scoped", root)
	for _, h := range hosts {
		if h.Name == host {
			return h, true
		}
	}
	return storage.HostInfo{}, false
}

func TestEtcdHostListHostsReportsLiveness(t *testing.T) {
	root := uniqueRoot(t)
	cli := etcdServer(t).Client(t)
	hosts, ok, err := storage.ListHosts(context.Background(), cli, uniqueRoot(t))
	require.NoError(t, err)
	assert.False(t, ok, "an empty root is not host-scoped")
	assert.Empty(t, hosts)
	plainRoot := uniqueRoot(t)
	update(t, openEtcd(t, plainRoot), func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	_, ok, err = storage.ListHosts(context.Background(), cli, plainRoot)
	require.NoError(t, err)
	assert.False(t, ok, "a root without host scopes")

	start := time.Now().Add(-time.Second)
	a := openEtcd(t, root, storage.WithHost("a"), storage.WithHostTTL(5*time.Second))
	b := hostStore(t, root, "b")
	hosts, ok, err = storage.ListHosts(context.Background(), cli, root)
	require.NoError(t, err)
	require.True(t, ok)
	require.Len(t, hosts, 2)
	assert.Equal(t, "a", hosts[0].Name)
	assert.Equal(t, "b", hosts[1].Name)
	for _, h := range hosts {
		assert.True(t, h.Alive, "host %s is alive", h.Name)
		assert.NotZero(t, h.Lease, "host %s has a lease", h.Name)
		assert.Greater(t, h.TTL, time.Duration(0), "host %s", h.Name)
		assert.False(t, h.Since.Before(start.Truncate(time.Second)), "host %s since %v", h.Name, h.Since)
		assert.False(t, h.Since.After(time.Now()), "host %s since %v", h.Name, h.Since)
	}
	assert.LessOrEqual(t, hosts[0].TTL, 5*time.Second)
	assert.NotEqual(t, hosts[0].Lease, hosts[1].Lease)
	since := hosts[0].Since

	require.NoError(t, a.Close())
	h, found := hostInfo(t, root, "a")
	require.True(t, found, "a closed host is still a host of the root")
	assert.False(t, h.Alive)
	assert.Zero(t, h.Lease)
	assert.Zero(t, h.TTL)
	assert.Equal(t, since, h.Since, "since the first open")
	h, _ = hostInfo(t, root, "b")
	assert.True(t, h.Alive)
	_ = b
}

// vanish opens host's scope of root on a client of its own and closes that
// client, as a host that crashes or is cut off: its lease is kept alive no
// more. It returns the store, which the test closes.
func vanish(t *testing.T, root, host string, fn func(ctx context.Context) error) storage.MetaStore {
	t.Helper()
	cfg := etcdServer(t).ClientConfig()
	cli, err := clientv3.New(cfg)
	require.NoError(t, err)
	ms, err := storage.NewEtcdStoreFromClient(cli, root, storage.WithHost(host), storage.WithHostTTL(2*time.Second))
	if err != nil {
		_ = cli.Close()
		require.NoError(t, err)
	}
	t.Cleanup(func() { _ = ms.Close(); _ = cli.Close() })
	if fn != nil {
		update(t, ms, fn)
	}
	require.NoError(t, cli.Close())
	return ms
}

// waitHostGone polls until host of root is not alive and returns how long
// that took.
func waitHostGone(t *testing.T, root, host string, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		h, _ := hostInfo(t, root, host)
		if !h.Alive {
			return time.Since(start)
		}
		require.Less(t, time.Since(start), within, "host %s still alive", host)
		time.Sleep(100 * time.Millisecond)
	}
}

func TestEtcdHostThatVanishedStaysAliveUntilItsTTL(t *testing.T) {
	root := uniqueRoot(t)
	gone := vanish(t, root, "v", func(ctx context.Context) error { return commitLayer(ctx, "base", "") })
	vanished := time.Now()

	h, _ := hostInfo(t, root, "v")
	assert.True(t, h.Alive, "a vanished host is alive until its lease runs out")
	ms, err := openHost(t, root, storage.WithHost("v"))
	assert.Nil(t, ms)
	require.ErrorIs(t, err, storage.ErrHostAlive)

	// etcd's minimum TTL (1.5 election timeouts, rounded up to seconds)
	// may exceed the 2 s asked for; the lease lasts at least a second.
	waitHostGone(t, root, "v", 15*time.Second)
	assert.GreaterOrEqual(t, time.Since(vanished), time.Second, "gone before its TTL")
	t.Logf("host gone %v after its client closed", time.Since(vanished).Round(100*time.Millisecond))

	again, err := openHost(t, root, storage.WithHost("v"))
	require.NoError(t, err)
	require.NoError(t, again.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		return commitLayer(ctx, "next", "base")
	}))
	// Its client closed under it, the store cannot revoke its lease; Close
	// may say so, and must return.
	_ = gone.Close()
}

// TestEtcdHostCloseAfterAnOutsideRevoke: a store whose lease was revoked
// (or expired) before its keep-alives noticed closes without error: the
// host is gone, which is what Close is for.
func TestEtcdHostCloseAfterAnOutsideRevoke(t *testing.T) {
	for range 5 {
		root := uniqueRoot(t)
		a := hostStore(t, root, "a")
		revokeHost(t, root, "a")
		require.NoError(t, a.Close())
		h, _ := hostInfo(t, root, "a")
		assert.False(t, h.Alive)
	}
}

// revokeHost revokes, from outside, the lease ListHosts reports for host.
func revokeHost(t *testing.T, root, host string) {
	t.Helper()
	h, found := hostInfo(t, root, host)
	require.True(t, found && h.Alive, "host %s is alive: %+v", host, h)
	cli := etcdServer(t).Client(t)
	_, err := cli.Revoke(context.Background(), h.Lease)
	require.NoError(t, err)
}

func TestEtcdHostRevokedLeaseFencesEveryCommit(t *testing.T) {
	for _, revoke := range []bool{false, true} {
		t.Run(fmt.Sprintf("revoke=%v", revoke), func(t *testing.T) {
			root := uniqueRoot(t)
			a := hostStore(t, root, "a")
			update(t, a, func(ctx context.Context) error { return commitLayer(ctx, "base", "") })

			// A transaction begun before the revoke, committed after it.
			ctx, tx, err := a.TransactionContext(context.Background(), true)
			require.NoError(t, err)
			_, err = createActive(ctx, "pending", "base", nil)
			require.NoError(t, err)
			_, _, err = storage.Remove(ctx, "base")
			assert.Error(t, err, "base has a child in the transaction")
			if revoke {
				revokeHost(t, root, "a")
			}
			err = tx.Commit()
			if !revoke {
				require.NoError(t, err, "control: without the revoke the same transaction commits")
				update(t, a, func(ctx context.Context) error { return commitLayer(ctx, "later", "base") })
				return
			}
			require.ErrorIs(t, err, storage.ErrHostExpired)
			assert.True(t, errdefs.IsFailedPrecondition(err))

			// Every later writable transaction is refused; reads go on.
			err = a.WithTransaction(context.Background(), true, func(ctx context.Context) error {
				return commitLayer(ctx, "later", "base")
			})
			require.ErrorIs(t, err, storage.ErrHostExpired)
			require.NoError(t, a.WithTransaction(context.Background(), false, func(ctx context.Context) error {
				_, _, _, err := storage.GetInfo(ctx, "base")
				assert.NoError(t, err, "reads work after expiry")
				_, _, _, err = storage.GetInfo(ctx, "pending")
				assert.True(t, errdefs.IsNotFound(err), "the fenced commit applied nothing: %v", err)
				return nil
			}))
			h, _ := hostInfo(t, root, "a")
			assert.False(t, h.Alive)

			// The host opens again, and writes.
			again, err := openHost(t, root, storage.WithHost("a"))
			require.NoError(t, err)
			update(t, again, func(ctx context.Context) error {
				_, _, _, err := storage.GetInfo(ctx, "pending")
				assert.True(t, errdefs.IsNotFound(err))
				return commitLayer(ctx, "later", "base")
			})
			// The expired store stays refused even though its host lives again.
			err = a.WithTransaction(context.Background(), true, func(ctx context.Context) error {
				return commitLayer(ctx, "stale", "base")
			})
			require.ErrorIs(t, err, storage.ErrHostExpired)
			require.NoError(t, a.Close(), "closing an expired store")
			requireClean(t, again)
			assert.False(t, slices.Contains(rootKeys(t, root), "scopes/a/snapshots/stale"))
		})
	}
}

// TestEtcdHostStoreWithoutHostOpenWhenTheRootBecomesHostScoped: a store
// without host that checked the root (empty then) at its first transaction
// must not write unscoped records once a host has made the root
// host-scoped: neither a commit in flight nor a later one.
func TestEtcdHostStoreWithoutHostOpenWhenTheRootBecomesHostScoped(t *testing.T) {
	root := uniqueRoot(t)
	plain := openEtcd(t, root)
	require.NoError(t, plain.WithTransaction(context.Background(), false, func(ctx context.Context) error { return nil }))
	ctx, tx, err := plain.TransactionContext(context.Background(), true)
	require.NoError(t, err)
	require.NoError(t, commitLayer(ctx, "inflight", ""))
	_ = hostStore(t, root, "a")
	err = tx.Commit()
	assert.ErrorIs(t, err, storage.ErrScopeMismatch, "in-flight commit")
	err = plain.WithTransaction(context.Background(), true, func(ctx context.Context) error { return commitLayer(ctx, "later", "") })
	assert.ErrorIs(t, err, storage.ErrScopeMismatch, "later commit")
	for _, k := range rootKeys(t, root) {
		assert.False(t, strings.HasPrefix(k, storage.KeyEtcdSnapshots+"/"), "unscoped record %s in a host-scoped root", k)
	}
}
