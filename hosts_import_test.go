package storage_test

import (
	"context"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/snapmeta/storage"
)

// exportHost walks one host's scope through an operator's view.
func exportHost(t *testing.T, root, host string) []storage.Record {
	t.Helper()
	view := openEtcd(t, root, storage.WithHostView(host))
	var recs []storage.Record
	require.NoError(t, view.WithTransaction(context.Background(), false, func(ctx context.Context) error {
		return storage.Walk(ctx, func(r storage.Record) error {
			recs = append(recs, r)
			return nil
		})
	}))
	return recs
}

func TestEtcdImportCarriesHostScopesAndSharedLayers(t *testing.T) {
	src := uniqueRoot(t)
	a, b := hostStore(t, src, "a"), hostStore(t, src, "b")
	update(t, a, func(ctx context.Context) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "x1", ""); err != nil {
			return err
		}
		if _, err := storage.CommitShared(ctx, "x1", "a/base", "chain-1", snapshots.Usage{Size: 3}); err != nil {
			return err
		}
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "a/work", "a/base")
		return err
	})
	update(t, b, func(ctx context.Context) error {
		_, err := storage.BindLayer(ctx, "b/base", "", "chain-1")
		return err
	})
	recsA, recsB := exportHost(t, src, "a"), exportHost(t, src, "b")
	require.Len(t, recsA, 2)
	require.Len(t, recsB, 1)
	assert.Equal(t, "a", recsA[0].Host)
	assert.Equal(t, "chain-1", recsA[0].Content)
	assert.Equal(t, recsA[0].ID, recsB[0].ID, "both bindings carry the layer's ID")

	dst := uniqueRoot(t)
	// Each host's records go into its scope as snapmeta imports them: as
	// the host, whose lease keeps it from starting meanwhile.
	for host, recs := range map[string][]storage.Record{"a": recsA, "b": recsB} {
		importer := hostStore(t, dst, host)
		update(t, importer, func(ctx context.Context) error { return storage.Import(ctx, recs...) })
		require.NoError(t, importer.Close())
	}
	requireClean(t, openEtcd(t, dst, storage.WithHostView("a")))
	assert.ElementsMatch(t, recsA, exportHost(t, dst, "a"))
	assert.ElementsMatch(t, recsB, exportHost(t, dst, "b"))

	// The references came along: a's binding is not the last.
	a2 := openEtcd(t, dst, storage.WithHostView("a"))
	update(t, a2, func(ctx context.Context) error {
		if _, _, err := storage.Remove(ctx, "a/work"); err != nil {
			return err
		}
		_, _, last, err := storage.Release(ctx, "a/base")
		require.NoError(t, err)
		assert.False(t, last)
		return nil
	})
}

func TestEtcdImportRefusesAnotherHostsRecord(t *testing.T) {
	root := uniqueRoot(t)
	a := hostStore(t, root, "a")
	err := a.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		return storage.Import(ctx, storage.Record{Name: "x", ID: "7", Kind: snapshots.KindActive, Host: "b"})
	})
	assert.True(t, errdefs.IsInvalidArgument(err), "got %v", err)
	bolt := openBolt(t, t.TempDir())
	err = bolt.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		return storage.Import(ctx, storage.Record{Name: "x", ID: "7", Kind: snapshots.KindCommitted, Content: "c"})
	})
	assert.ErrorIs(t, err, storage.ErrNotScoped)
}

func TestEtcdViewOfAHostTheRootDoesNotListIsNotFound(t *testing.T) {
	root := uniqueRoot(t)
	hostStore(t, root, "a")
	cfg := etcdServer(t).ClientConfig()
	ms, err := storage.NewEtcdStore(root, &cfg, storage.WithHostView("nobody"))
	if err == nil {
		_ = ms.Close()
	}
	assert.True(t, errdefs.IsNotFound(err), "got %v", err)
	view := openEtcd(t, root, storage.WithHostView("a"))
	requireClean(t, view)
}

func TestHostOfNamesTheScopeOfAStore(t *testing.T) {
	root := uniqueRoot(t)
	for _, tc := range []struct {
		name string
		ms   storage.MetaStore
		host string
	}{
		{"WithHost", hostStore(t, root, "a"), "a"},
		{"WithHostView", openEtcd(t, root, storage.WithHostView("a")), "a"},
		{"etcd without host scopes", openEtcd(t, uniqueRoot(t)), ""},
		{"bbolt", openBolt(t, t.TempDir()), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host, ok := storage.HostOf(tc.ms)
			assert.Equal(t, tc.host, host)
			assert.Equal(t, tc.host != "", ok)
		})
	}
}

// wrappedStore is a MetaStore behind another type, as a daemon keeps one
// with the client it owns.
type wrappedStore struct{ storage.MetaStore }

func TestHostOfSeesThroughAWrapper(t *testing.T) {
	root := uniqueRoot(t)
	host, ok := storage.HostOf(wrappedStore{hostStore(t, root, "a")})
	assert.True(t, ok)
	assert.Equal(t, "a", host)
}
