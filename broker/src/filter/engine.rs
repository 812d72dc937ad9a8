//! The Lua side of filters: one sandboxed Lua 5.4 state per thread, the compiled
//! filters it holds, and the call itself. Nothing of mlua leaves this file.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use mlua::chunk::ChunkMode;
use mlua::{
    Function, HookTriggers, Lua, LuaOptions, LuaString, RegistryKey, StdLib, Table, Value, VmState,
};

use crate::filter::{Context, EvalError, EventView, FilterLimits, LoadedFilter};

/// Instructions between two checks of the budget.
const HOOK_EVERY: u32 = 1000;
/// Compiled contexts kept per thread before the cache is emptied.
const MAX_CACHED_CONTEXTS: usize = 100_000;
/// Deepest JSON nesting `event:json()` converts.
const MAX_JSON_DEPTH: usize = 64;

/// Lua run once per state: read-only library views, no way to load code or reach the
/// host, and a base environment each filter's globals fall back to.
const PRELUDE: &str = r#"
local function readonly(t, name)
  return setmetatable({}, {
    __index = t,
    __newindex = function() error(name .. " is read-only", 2) end,
    __metatable = false,
  })
end
getmetatable("").__metatable = false
local base = {
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs,
  pcall = pcall, select = select, tonumber = tonumber, tostring = tostring,
  type = type, xpcall = xpcall, rawequal = rawequal, rawlen = rawlen, rawget = rawget,
  setmetatable = setmetatable, getmetatable = getmetatable,
  string = readonly(string, "string"), table = readonly(table, "table"),
  math = readonly(math, "math"), utf8 = readonly(utf8, "utf8"),
}
base._G = base
return readonly(base, "the base environment")
"#;

/// A filter compiled in this thread's state.
struct Compiled {
    version: u64,
    function: Function,
}

/// This thread's Lua state and what it caches.
pub struct Engine {
    lua: Lua,
    /// The read-only base environment each filter's own environment falls back to.
    base: Table,
    filters: HashMap<String, Compiled>,
    /// Context tables by context id.
    contexts: HashMap<u64, RegistryKey>,
    /// The current record's table, made anew when the record changes.
    event: Table,
    /// `event:json()`, shared by every event table.
    json: Function,
    event_key: Option<u64>,
    subscription: Table,
    /// Instruction checks left for the running call.
    budget: Rc<Cell<u32>>,
    limits: FilterLimits,
}

thread_local! {
    static ENGINE: RefCell<Option<Engine>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's engine, creating it (or replacing it, when the limits
/// changed) first.
pub fn with_engine<T>(
    limits: FilterLimits,
    f: impl FnOnce(&mut Engine) -> T,
) -> Result<T, EvalError> {
    ENGINE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|e| e.limits != limits) {
            *slot = Some(Engine::new(limits).map_err(|e| EvalError::Engine(e.to_string()))?);
        }
        Ok(f(slot.as_mut().expect("created above")))
    })
}

fn lua_error(error: mlua::Error) -> String {
    // The message without mlua's traceback.
    match error {
        mlua::Error::CallbackError { cause, .. } => lua_error((*cause).clone()),
        mlua::Error::MemoryError(message) => format!("memory limit reached: {message}"),
        other => other
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
    }
}

impl Engine {
    fn new(limits: FilterLimits) -> mlua::Result<Engine> {
        let lua = Lua::new_with(
            StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8,
            LuaOptions::default(),
        )?;
        lua.set_memory_limit(limits.memory_bytes)?;
        let base: Table = lua
            .load(PRELUDE)
            .set_name("=prelude")
            .set_mode(ChunkMode::Text)
            .eval()?;
        let budget = Rc::new(Cell::new(0u32));
        let left = budget.clone();
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(HOOK_EVERY),
            move |_, _| {
                let remaining = left.get();
                if remaining == 0 {
                    return Err(mlua::Error::runtime("instruction budget exhausted"));
                }
                left.set(remaining - 1);
                Ok(VmState::Continue)
            },
        )?;
        // event:json() decodes the payload once per event and caches the result.
        let json = lua.create_function(|lua, event: Table| {
            if let Some(cached) = event
                .raw_get::<Option<Value>>("_json")?
                .filter(|v| !v.is_nil())
            {
                return Ok(cached);
            }
            let payload: LuaString = event.raw_get("payload")?;
            let parsed: serde_json::Value = serde_json::from_slice(&payload.as_bytes())
                .map_err(|e| mlua::Error::runtime(format!("payload is not JSON: {e}")))?;
            let value = json_to_lua(lua, &parsed, 0)?;
            event.raw_set("_json", value.clone())?;
            Ok(value)
        })?;
        let event = lua.create_table()?;
        let subscription = lua.create_table()?;
        Ok(Engine {
            lua,
            base,
            filters: HashMap::new(),
            contexts: HashMap::new(),
            event,
            json,
            event_key: None,
            subscription,
            budget,
            limits,
        })
    }

    /// Compiles `source` (text only) into a filter function in a fresh environment.
    pub fn compile(&self, chunk_name: &str, source: &str) -> Result<Function, String> {
        let env = self.lua.create_table().map_err(lua_error)?;
        let meta = self.lua.create_table().map_err(lua_error)?;
        meta.raw_set("__index", self.base.clone())
            .map_err(lua_error)?;
        env.set_metatable(Some(meta)).map_err(lua_error)?;
        let chunk = self
            .lua
            .load(source)
            .set_name(format!("@{chunk_name}"))
            .set_mode(ChunkMode::Text)
            .set_environment(env)
            .into_function()
            .map_err(lua_error)?;
        // Running the chunk defines the filter; it is bounded like a call.
        self.budget.set(self.limits.instructions / HOOK_EVERY);
        match chunk.call::<Value>(()).map_err(lua_error)? {
            Value::Function(function) => Ok(function),
            other => Err(format!(
                "the file must return the filter function (`return function(event, subscription) ... end`), not {}",
                other.type_name()
            )),
        }
    }

    /// The compiled function of `filter`, compiling it if this thread has an older
    /// version.
    fn function(&mut self, filter: &LoadedFilter) -> Result<Function, EvalError> {
        if let Some(compiled) = self.filters.get(&filter.name)
            && compiled.version == filter.version
        {
            return Ok(compiled.function.clone());
        }
        let function = self
            .compile(&filter.file, &filter.source)
            .map_err(EvalError::Compile)?;
        self.filters.insert(
            filter.name.clone(),
            Compiled {
                version: filter.version,
                function: function.clone(),
            },
        );
        Ok(function)
    }

    /// Makes the event table for a new record (a fresh table per record, so what a
    /// filter memoizes in it never outlives the record; reused for every subscription
    /// evaluated on the record).
    fn set_event(&mut self, event: &EventView<'_>) -> mlua::Result<()> {
        if self.event_key == Some(event.key) {
            return Ok(());
        }
        let table = self.lua.create_table_with_capacity(0, 8)?;
        table.raw_set("json", self.json.clone())?;
        table.raw_set("topic", event.topic)?;
        table.raw_set("offset", event.offset)?;
        table.raw_set("timestamp", event.timestamp_ms)?;
        let headers = self
            .lua
            .create_table_with_capacity(0, event.headers.len())?;
        for (key, value) in event.headers {
            headers.raw_set(key.as_str(), value.as_str())?;
        }
        table.raw_set("headers", headers)?;
        table.raw_set("payload", self.lua.create_string(event.payload)?)?;
        self.event = table;
        self.event_key = Some(event.key);
        Ok(())
    }

    fn context_table(&mut self, context: &Context) -> mlua::Result<Table> {
        if let Some(key) = self.contexts.get(&context.id()) {
            return self.lua.registry_value(key);
        }
        if self.contexts.len() >= MAX_CACHED_CONTEXTS {
            self.contexts.clear();
            self.lua.expire_registry_values();
        }
        let table = self
            .lua
            .create_table_with_capacity(0, context.values().len())?;
        for (key, value) in context.values() {
            table.raw_set(key.as_str(), value.as_str())?;
        }
        let key = self.lua.create_registry_value(table.clone())?;
        self.contexts.insert(context.id(), key);
        Ok(table)
    }

    /// Runs `filter` for one subscription: `true` to deliver.
    pub fn evaluate(
        &mut self,
        filter: &LoadedFilter,
        event: &EventView<'_>,
        subscription_id: u64,
        context: &Context,
    ) -> Result<bool, EvalError> {
        let function = self.function(filter)?;
        let runtime = |e: mlua::Error| EvalError::Runtime(lua_error(e));
        self.set_event(event).map_err(runtime)?;
        let context_table = self.context_table(context).map_err(runtime)?;
        self.subscription
            .raw_set("id", subscription_id)
            .map_err(runtime)?;
        self.subscription
            .raw_set("context", context_table)
            .map_err(runtime)?;
        self.budget.set(self.limits.instructions / HOOK_EVERY);
        let result = function.call::<Value>((self.event.clone(), self.subscription.clone()));
        match result {
            Ok(Value::Boolean(deliver)) => Ok(deliver),
            Ok(other) => Err(EvalError::Runtime(format!(
                "the filter returned {}, not a boolean",
                other.type_name()
            ))),
            Err(error) => {
                let memory = matches!(error, mlua::Error::MemoryError(_));
                let message = lua_error(error);
                if memory {
                    // Give the memory back before the next call.
                    let _ = self.lua.gc_collect();
                }
                Err(EvalError::Runtime(message))
            }
        }
    }
}

/// Converts decoded JSON into Lua values (objects and arrays become tables).
fn json_to_lua(lua: &Lua, value: &serde_json::Value, depth: usize) -> mlua::Result<Value> {
    if depth > MAX_JSON_DEPTH {
        return Err(mlua::Error::runtime("payload JSON nests too deeply"));
    }
    Ok(match value {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::String(lua.create_string(s)?),
        serde_json::Value::Array(items) => {
            let table = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                table.raw_set(i + 1, json_to_lua(lua, item, depth + 1)?)?;
            }
            Value::Table(table)
        }
        serde_json::Value::Object(fields) => {
            let table = lua.create_table_with_capacity(0, fields.len())?;
            for (key, item) in fields {
                table.raw_set(key.as_str(), json_to_lua(lua, item, depth + 1)?)?;
            }
            Value::Table(table)
        }
    })
}
