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

func refLabel(chainID string) snapshots.Opt {
	return snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: chainID})
}

// TestRemoteProtocolBindsAnotherHostsLayer follows containerd's unpacker:
// host a unpacks and commits a labelled layer, host b's labelled Prepare
// finds it (AlreadyExists) and its binding carries the label on the same
// parent, as containerd's metadata layer looks for it.
func TestRemoteProtocolBindsAnotherHostsLayer(t *testing.T) {
	ctx := context.Background()
	root := uniqueRoot(t)
	a, b := hostStore(t, root, "a"), hostStore(t, root, "b")
	update(t, a, func(ctx context.Context) error {
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "a/extract-1", "", refLabel("chain-1")); err != nil {
			return err
		}
		_, err := storage.CommitRemote(ctx, "a/extract-1", "a/chain-1", snapshots.Usage{Size: 7}, refLabel("chain-1"))
		return err
	})
	// Without the label, or for a layer nobody committed, there is nothing
	// to bind: the driver prepares as usual.
	require.NoError(t, storage.PrepareRemote(ctx, b, "b/plain", ""))
	require.NoError(t, storage.PrepareRemote(ctx, b, "b/extract-9", "", refLabel("chain-9")))

	err := storage.PrepareRemote(ctx, b, "b/extract-1", "", refLabel("chain-1"))
	require.True(t, errdefs.IsAlreadyExists(err), "got %v", err)
	require.NoError(t, b.WithTransaction(ctx, false, func(ctx context.Context) error {
		var found []snapshots.Info
		err := storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
			found = append(found, info)
			return nil
		}, `labels."containerd.io/snapshot.ref"==chain-1,parent==""`)
		require.Len(t, found, 1)
		assert.Equal(t, snapshots.KindCommitted, found[0].Kind)
		assert.Equal(t, "b/extract-1", found[0].Name)
		return err
	}))
	requireClean(t, b)
}

// TestRemoteProtocolWithoutHostScopesIsPlainCommit: on a store without
// host scopes PrepareRemote binds nothing and CommitRemote is CommitActive,
// label and all.
func TestRemoteProtocolWithoutHostScopesIsPlainCommit(t *testing.T) {
	ctx := context.Background()
	for name, ms := range map[string]storage.MetaStore{"bolt": openBolt(t, t.TempDir()), "etcd": openEtcd(t, uniqueRoot(t))} {
		t.Run(name, func(t *testing.T) {
			require.NoError(t, storage.PrepareRemote(ctx, ms, "x", "", refLabel("chain-1")))
			update(t, ms, func(ctx context.Context) error {
				if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "x", ""); err != nil {
					return err
				}
				if _, err := storage.CommitRemote(ctx, "x", "layer", snapshots.Usage{}, refLabel("chain-1")); err != nil {
					return err
				}
				_, info, _, err := storage.GetInfo(ctx, "layer")
				assert.Equal(t, "chain-1", info.Labels[snapshots.LabelSnapshotRef])
				bound, berr := storage.BindRemote(ctx, "y", "", refLabel("chain-1"))
				assert.False(t, bound)
				assert.NoError(t, berr)
				return err
			})
		})
	}
}
