package storage_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestContainerdDifferencesAreAsDocumented runs each difference the README
// lists under "Differences from containerd's store" that is about what a
// call answers, on containerd's store and on ours, and checks that both
// answer as the README says. If containerd changes, this test says which
// sentence of the README became untrue.
func TestContainerdDifferencesAreAsDocumented(t *testing.T) {
	type outcome struct {
		class string // ctrdClass of the last step's error; "" for nil
		// parent, when set, is the parent the last step's snapshot reads
		// back with.
		parent string
	}
	cases := []struct {
		name string
		// setup runs first, in its own transaction, and must succeed.
		setup func(ctx context.Context, f ctrdImpl) error
		// step is the call the difference is about; readBack names the
		// snapshot whose parent is read back when it succeeds.
		step       func(ctx context.Context, f ctrdImpl) error
		readBack   string
		containerd outcome
		ours       outcome
	}{
		{
			name: "a name one byte over MaxNameSize",
			step: func(ctx context.Context, f ctrdImpl) error {
				_, err := f.CreateSnapshot(ctx, snapshots.KindActive, strings.Repeat("n", 4097), "")
				return err
			},
			containerd: outcome{},
			ours:       outcome{class: "InvalidArgument"},
		},
		{
			name: "a label of 5001 bytes",
			step: func(ctx context.Context, f ctrdImpl) error {
				_, err := f.CreateSnapshot(ctx, snapshots.KindActive, "a", "",
					snapshots.WithLabels(map[string]string{"k": strings.Repeat("v", 5000)}))
				return err
			},
			containerd: outcome{},
			ours:       outcome{class: "InvalidArgument"},
		},
		{
			name: "a rebase onto the active itself",
			setup: func(ctx context.Context, f ctrdImpl) error {
				_, err := f.CreateSnapshot(ctx, snapshots.KindActive, "a", "")
				return err
			},
			step: func(ctx context.Context, f ctrdImpl) error {
				_, err := f.CommitActive(ctx, "a", "c", snapshots.Usage{}, snapshots.WithParent("a"))
				return err
			},
			containerd: outcome{class: "NotFound"},
			ours:       outcome{class: "FailedPrecondition"},
		},
		{
			name: "a rebase onto the snapshot's own new name",
			setup: func(ctx context.Context, f ctrdImpl) error {
				_, err := f.CreateSnapshot(ctx, snapshots.KindActive, "a", "")
				return err
			},
			step: func(ctx context.Context, f ctrdImpl) error {
				_, err := f.CommitActive(ctx, "a", "c", snapshots.Usage{}, snapshots.WithParent("c"))
				return err
			},
			readBack: "c",
			// containerd commits a snapshot that is its own parent.
			containerd: outcome{parent: "c"},
			ours:       outcome{class: "NotFound"},
		},
		{
			name: "a filter whose regular expression does not compile",
			setup: func(ctx context.Context, f ctrdImpl) error {
				_, err := f.CreateSnapshot(ctx, snapshots.KindActive, "a", "")
				return err
			},
			step: func(ctx context.Context, f ctrdImpl) error {
				return f.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil }, "name~=(")
			},
			// containerd matches nothing (and logs an error per snapshot).
			containerd: outcome{},
			ours:       outcome{class: "InvalidArgument"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, impl := range []struct {
				f    ctrdImpl
				want outcome
			}{{ctrdTheirs, tc.containerd}, {ctrdOurs, tc.ours}} {
				t.Run(impl.f.name, func(t *testing.T) {
					withTx, closeFn, err := impl.f.open(filepath.Join(t.TempDir(), "metadata.db"))
					require.NoError(t, err)
					defer func() { assert.NoError(t, closeFn()) }()
					if tc.setup != nil {
						require.NoError(t, withTx(true, func(ctx context.Context) error { return tc.setup(ctx, impl.f) }))
					}
					var got outcome
					var stepErr error
					_ = withTx(true, func(ctx context.Context) error {
						stepErr = tc.step(ctx, impl.f)
						return stepErr
					})
					got.class = ctrdClass(stepErr)
					if stepErr == nil && tc.readBack != "" {
						require.NoError(t, withTx(false, func(ctx context.Context) error {
							_, info, _, err := impl.f.GetInfo(ctx, tc.readBack)
							got.parent = info.Parent
							return err
						}))
					}
					assert.Equal(t, impl.want, got, "error: %v", stepErr)
				})
			}
		})
	}
}
