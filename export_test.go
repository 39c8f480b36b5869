package storage

import "time"

// SetCloseTimeout shortens how long Close of ms waits for transactions in
// flight, for tests of a stuck one.
func SetCloseTimeout(ms MetaStore, d time.Duration) { ms.(*metaStore).closeTimeout = d }
