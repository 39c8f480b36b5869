//go:build linux

package powercut_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine outlives the tests: every store
// must be closed and every mount's server stopped.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
